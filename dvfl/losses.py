"""Knowledge-distillation loss for DVFL-Net (teacher -> student), with its parts.

Definition (Hinton et al., 2015), per batch of ``B`` clips and ``C`` classes::

    total = alpha * T**2 * KL( softmax(t / T) || softmax(s / T) ) + (1 - alpha) * CE(s, y)

* ``KL`` is the real Kullback-Leibler divergence of the student's tempered distribution from the
  teacher's, ``sum_c p_t[c] * (log p_t[c] - log p_s[c])``. Both sides go through ``log_softmax``
  (``p_t * (log p_t - log p_s)``, taken as 0 where ``p_t = 0``), which is numerically stable for
  confident teachers (logits of +-1e4 at ``T = 1`` give finite values and gradients) and for masked
  teacher logits (``-inf``: a class the teacher rules out adds nothing).

  The official DVFL-Net code passes ``softmax`` (probabilities) as the *student* argument of
  ``F.kl_div``, which expects log-probabilities. The value it optimises is then not a KL divergence
  (it is not zero when student == teacher, can be negative, and its gradient is not the KD
  gradient). That bug is deliberately **not** reproduced here.
* The ``T**2`` factor keeps the KD gradient magnitude independent of ``T`` (the soft-target
  gradient scales as ``1/T**2``), so ``alpha`` means the same thing at every temperature.
* Everything is computed in (at least) fp32: inputs are cast up (fp16/bf16 teacher logits from a
  cache are fine) and autocast is disabled inside the loss. float64 inputs stay float64.
* The teacher side is detached: no gradient flows into the teacher logits.

Averaging and unlabelled clips
------------------------------
A clip is *labelled* when it has a target and is not masked out:

* hard targets ``(B,)`` integer class ids: a clip whose id equals ``ignore_index`` (default ``-1``)
  is unlabelled;
* soft targets ``(B, C)`` float rows (mixup / cutmix probability rows, timm's
  ``SoftTargetCrossEntropy`` semantics ``-sum_c y[c] * log_softmax(s)[c]``);
* ``targets=None``: every clip is unlabelled (pure distillation);
* an optional boolean ``labelled`` mask ``(B,)`` is AND-ed with the above (use it to mark
  unlabelled rows of a soft-target tensor).

The two terms are averaged differently, on purpose:

* ``kd`` is a batch mean over **all** ``B`` clips: ``T**2 * sum_i w_i * KL_i / B`` with ``w_i = 1``
  for labelled clips and ``w_i = unlabeled_weight`` (default 1) for unlabelled ones. With the
  default weight this is exactly ``F.kl_div(..., reduction="batchmean") * T**2``.
* ``ce`` is a mean over the **labelled clips only**: ``sum_{i labelled} CE_i / n_labelled``
  (0 when a batch has no labelled clip, so ``total`` is then ``alpha * kd``).

Unlabelled clips can never reach the CE term: before the cross-entropy is evaluated their targets
are *replaced* (``torch.where``) by a harmless placeholder, and their per-clip CE is multiplied by 0.
Whatever an unlabelled row holds (``-1``, an out-of-range id, NaN soft rows) never enters a
computation, and the per-clip CE of those rows contributes exactly 0 to value and gradient.
No boolean indexing is used, so the loss has static shapes and never synchronises with the GPU.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DistillationLoss", "DistillationLossOutput", "distillation_loss", "kl_per_clip"]


class DistillationLossOutput(NamedTuple):
    """The total loss and its parts (all 0-dim tensors in the compute dtype).

    ``total = alpha * kd + (1 - alpha) * ce``; ``kd`` already includes the ``T**2`` factor.
    ``num_labelled`` is the number of clips that entered the CE mean (a tensor, no host sync).
    """

    total: Tensor
    kd: Tensor
    ce: Tensor
    num_labelled: Tensor


def _check_real(name: str, value, low: float, high: float, low_open: bool = False,
                high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}: {value!r}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if not math.isfinite(value) or below or above:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be finite and in {lo}{low}, {high}{hi}, got {value!r}")
    return value


def _validate_hparams(alpha, temperature, unlabeled_weight, label_smoothing):
    alpha = _check_real("alpha", alpha, 0.0, 1.0)
    temperature = _check_real("temperature", temperature, 0.0, math.inf, low_open=True,
                              high_open=True)
    unlabeled_weight = _check_real("unlabeled_weight", unlabeled_weight, 0.0, math.inf,
                                   high_open=True)
    label_smoothing = _check_real("label_smoothing", label_smoothing, 0.0, 1.0, high_open=True)
    return alpha, temperature, unlabeled_weight, label_smoothing


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half/bfloat16 are cast up)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def kl_per_clip(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` for each clip, shape ``(B,)``, without the ``T**2``.

    Computed in at least fp32 with ``log_softmax`` on both sides; the teacher is detached.
    """
    temperature = _check_real("temperature", temperature, 0.0, math.inf, low_open=True,
                              high_open=True)
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError("student_logits and teacher_logits must both be (B, C), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    dtype = _compute_dtype(student_logits, teacher_logits)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        log_p_s = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.detach().to(device=student_logits.device,
                                                           dtype=dtype) / temperature, dim=-1)
        # p * (log p - log q), elementwise, with 0 where log p = -inf: a masked teacher logit is a
        # class the teacher rules out (kl_div(log_target=True) gives 0 * -inf = NaN there). A NaN or
        # +inf teacher logit still gives NaN: a broken teacher must not look like a finite loss.
        terms = torch.where(torch.isneginf(log_p_t), torch.zeros((), dtype=dtype, device=log_p_t.device),
                            log_p_t.exp() * (log_p_t - log_p_s))
        return terms.sum(dim=-1)


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Optional[Tensor] = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    *,
    labelled: Optional[Tensor] = None,
    ignore_index: int = -1,
    unlabeled_weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> DistillationLossOutput:
    """KD loss ``alpha * T**2 * KL(p_t || p_s) + (1 - alpha) * CE(s, y)``; see the module docstring.

    Args:
        student_logits: ``(B, C)`` raw student logits (any float dtype; computed in >= fp32).
        teacher_logits: ``(B, C)`` raw teacher logits (fp16 from a cache is fine); detached.
        targets: ``None`` (all clips unlabelled), ``(B,)`` integer class ids with ``ignore_index``
            for unlabelled clips, or ``(B, C)`` soft target rows (mixup), each summing to 1.
        alpha: weight of the KD term, in ``[0, 1]``. ``alpha = 0`` is plain cross-entropy.
        temperature: softmax temperature ``T > 0`` of the KD term.
        labelled: optional ``(B,)`` bool mask; ``False`` marks an unlabelled clip (KD only).
        ignore_index: hard-label value that marks an unlabelled clip.
        unlabeled_weight: KD weight (>= 0) of unlabelled clips relative to labelled ones.
        label_smoothing: in ``[0, 1)``; mixes the targets with the uniform distribution,
            ``(1 - eps) * y + eps / C`` (as ``F.cross_entropy(label_smoothing=eps)``).

    Returns:
        :class:`DistillationLossOutput` ``(total, kd, ce, num_labelled)``.
    """
    alpha, temperature, unlabeled_weight, label_smoothing = _validate_hparams(
        alpha, temperature, unlabeled_weight, label_smoothing)
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be (B, C), got {tuple(student_logits.shape)}")
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise TypeError("student_logits and teacher_logits must be floating-point tensors")
    batch, num_classes = student_logits.shape
    device = student_logits.device
    dtype = _compute_dtype(student_logits, teacher_logits)

    # ---- which clips are labelled (a (B,) bool tensor, no host sync) --------------------------
    if targets is None:
        is_labelled = torch.zeros(batch, dtype=torch.bool, device=device)
        soft = False
    elif (targets.dim() == 1 and not targets.is_floating_point()
          and targets.dtype != torch.bool):
        if targets.shape[0] != batch:
            raise ValueError(f"hard targets must be ({batch},), got {tuple(targets.shape)}")
        targets = targets.to(device)
        is_labelled = targets != ignore_index
        soft = False
    elif targets.dim() == 2 and targets.is_floating_point():
        if tuple(targets.shape) != (batch, num_classes):
            raise ValueError(f"soft targets must be ({batch}, {num_classes}), "
                             f"got {tuple(targets.shape)}")
        targets = targets.to(device)
        is_labelled = torch.ones(batch, dtype=torch.bool, device=device)
        soft = True
    else:
        raise ValueError("targets must be None, (B,) integer class ids or (B, C) float soft "
                         f"targets; got shape {tuple(targets.shape)} dtype {targets.dtype}")
    if labelled is not None:
        if labelled.dtype != torch.bool or tuple(labelled.shape) != (batch,):
            raise ValueError(f"labelled must be a ({batch},) bool tensor, got "
                             f"{tuple(labelled.shape)} {labelled.dtype}")
        is_labelled = is_labelled & labelled.to(device)

    with torch.autocast(device_type=device.type, enabled=False):
        # ---- KD: batch mean over all clips, T^2-scaled ------------------------------------------
        kl = kl_per_clip(student_logits, teacher_logits, temperature)  # (B,) in `dtype`
        if unlabeled_weight == 1.0:
            kd_weights = torch.ones(batch, dtype=dtype, device=device)
        else:
            kd_weights = torch.where(is_labelled,
                                     torch.ones((), dtype=dtype, device=device),
                                     torch.full((), unlabeled_weight, dtype=dtype, device=device))
        kd = (kl * kd_weights).sum() / batch * (temperature ** 2)

        # ---- CE: mean over labelled clips only ---------------------------------------------------
        num_labelled = is_labelled.sum()
        if targets is None:
            ce = torch.zeros((), dtype=dtype, device=device)
        else:
            log_p = F.log_softmax(student_logits.to(dtype), dim=-1)
            if soft:
                # Unlabelled rows are replaced by a uniform row *before* use, so their content
                # (even NaN/inf) never enters the computation.
                uniform = torch.full((), 1.0 / num_classes, dtype=dtype, device=device)
                y = torch.where(is_labelled[:, None], targets.to(dtype), uniform)
                if label_smoothing > 0.0:
                    y = y * (1.0 - label_smoothing) + label_smoothing / num_classes
                ce_per_clip = -(y * log_p).sum(dim=-1)
            else:
                # Unlabelled ids (ignore_index or anything else) are replaced by class 0; every
                # labelled id must be a class (PyTorch's own ignore_index, -100, would give 0 loss)
                safe = torch.where(is_labelled, targets, torch.zeros_like(targets)).long()
                ce_per_clip = F.cross_entropy(log_p, safe, reduction="none",
                                              label_smoothing=label_smoothing, ignore_index=ignore_index)
            ce_per_clip = torch.where(is_labelled, ce_per_clip, torch.zeros_like(ce_per_clip))
            ce = ce_per_clip.sum() / num_labelled.clamp(min=1).to(dtype)

        total = alpha * kd + (1.0 - alpha) * ce
    return DistillationLossOutput(total=total, kd=kd, ce=ce, num_labelled=num_labelled)


class DistillationLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`distillation_loss` holding the hyper-parameters.

    ``forward(student_logits, teacher_logits, targets=None, labelled=None)`` returns a
    :class:`DistillationLossOutput`; use ``.total`` for ``backward()``.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 1.0, *, ignore_index: int = -1,
                 unlabeled_weight: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        (self.alpha, self.temperature, self.unlabeled_weight,
         self.label_smoothing) = _validate_hparams(alpha, temperature, unlabeled_weight,
                                                   label_smoothing)
        self.ignore_index = int(ignore_index)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                targets: Optional[Tensor] = None,
                labelled: Optional[Tensor] = None) -> DistillationLossOutput:
        return distillation_loss(
            student_logits, teacher_logits, targets, self.alpha, self.temperature,
            labelled=labelled, ignore_index=self.ignore_index,
            unlabeled_weight=self.unlabeled_weight, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, temperature={self.temperature}, "
                f"unlabeled_weight={self.unlabeled_weight}, "
                f"label_smoothing={self.label_smoothing}, ignore_index={self.ignore_index}")
