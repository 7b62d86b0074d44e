"""Training: the shared Ray Train loop (teacher, VFL-Net baseline, DVFL-Net distillation)."""
