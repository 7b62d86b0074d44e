"""DVFL-Net on Ray: Video-FocalNet distillation as a distributed pipeline.

``import dvfl.models`` registers the Video-FocalNet variants with timm, so that
``timm.create_model("videofocalnet_nano", num_classes=101, num_frames=8)`` works. The package
itself imports nothing heavy: ingest's decode workers import :mod:`dvfl.data` without torch.
"""
__version__ = "0.1.0"
