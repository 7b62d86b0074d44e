"""What a real 224^2 run needs (issue 17): activation checkpointing, AMP, SGD+Nesterov, accumulation."""
from __future__ import annotations

import pytest
import torch

from dvfl.models import build_model
from dvfl.config import ConfigError, OptimSection
from dvfl.train.loop import _optimizer_step, amp_dtype, device_and_precision, epoch_line, make_optimizer

from conftest import tiny_config

KW = dict(num_classes=5, num_frames=4, img_size=32, embed_dim=16, depths=[1, 1, 2, 1], drop_path_rate=0.0)


def _loss_grads_and_saved_bytes(use_checkpoint: bool):
    torch.manual_seed(0)
    model = build_model("videofocalnet_nano", use_checkpoint=use_checkpoint, **KW).train()
    x = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    saved = []

    def pack(t):  # what autograd keeps for backward: the activation memory checkpointing saves
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).logsumexp(1).mean()
    peak = sum(saved)
    loss.backward()
    return float(loss), {k: p.grad.clone() for k, p in model.named_parameters()}, peak


def test_activation_checkpointing_gives_the_same_loss_with_less_saved_memory():
    loss, grads, plain = _loss_grads_and_saved_bytes(False)
    loss_ckpt, grads_ckpt, ckpt = _loss_grads_and_saved_bytes(True)
    assert loss_ckpt == pytest.approx(loss, abs=1e-6)
    for k in grads:
        torch.testing.assert_close(grads_ckpt[k], grads[k], rtol=1e-4, atol=1e-6)
    assert ckpt < 0.5 * plain, (ckpt, plain)  # the blocks' activations are recomputed, not kept


def test_amp_modes_and_the_gradscaler_step():
    assert amp_dtype(torch.device("cpu"), "fp16") is None  # CPU workers train in fp32
    assert amp_dtype(torch.device("cuda"), "off") is None
    assert amp_dtype(torch.device("cuda"), "fp16") is torch.float16
    with pytest.raises(ValueError, match="optim.amp"):
        amp_dtype(torch.device("cuda"), "int8")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = amp_dtype(device, "fp16")
    model = build_model("videofocalnet_nano", **KW).to(device)
    optim = OptimSection(optimizer="sgd", lr=0.1, weight_decay=0.0, momentum=0.9, clip_grad=1.0)
    opt = make_optimizer(model, optim)
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9
    # enabled on the CPU too: the gradients are unscaled before they are clipped, as fp16 runs do
    scaler = torch.amp.GradScaler(device.type, enabled=True)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(torch.randn(2, 4, 3, 32, 32, device=device))
    assert logits.dtype == (dtype or torch.float32)
    scaler.scale(torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1], device=device))).backward()
    assert _optimizer_step(model, opt, scaler, optim, 0, 10, 0) == 1
    changed = [k for k, p in model.named_parameters() if not torch.equal(p.detach(), before[k])]
    assert changed and all(torch.isfinite(p).all() for p in model.parameters())
    # clipped to norm 1 (these gradients' norm is ~5): SGD's first Nesterov step moves the weights by
    # lr x (1 + momentum) x the clipped gradient; unclipped (or clipped while still scaled) far more
    moved = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.detach() - before[k])
                                                  for k, p in model.named_parameters()]))
    assert 0.1 * 1.9 * 0.99 < float(moved) <= 0.1 * 1.9 * 1.001, float(moved)


def test_the_first_epoch_line_says_where_and_in_what_precision_the_run_trains():
    """On a GPU run a user reads "on cuda, bf16" (the H100 run of session 33); nothing else did say it."""
    m = {"epoch": 1, "train_loss": 2.0, "train_top1": 0.1, "val_top1": 0.2, "epoch_seconds": 3.0, "val_seconds": 0.5}
    assert device_and_precision(torch.device("cuda", 0), torch.bfloat16) == "cuda, bf16"
    assert device_and_precision(torch.device("cuda"), torch.float16) == "cuda, fp16"
    assert device_and_precision(torch.device("cpu"), None) == "cpu, fp32"
    assert epoch_line("dvfl s0", m, 12, "cuda, bf16").endswith("3.0s + val 0.5s on cuda, bf16")
    assert epoch_line("dvfl s0", m, 12).endswith("3.0s + val 0.5s")


def test_bf16_on_a_gpu_without_native_bf16_falls_back_to_fp32(monkeypatch):
    """Below compute capability 8 (T4, V100) PyTorch reports bf16 as supported through emulation
    (slow): optim.amp bf16 must train in fp32 there, as documented, not in emulated bf16."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert amp_dtype(torch.device("cuda"), "bf16") is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # sm_80+
    assert amp_dtype(torch.device("cuda"), "bf16") is torch.bfloat16


def test_accumulated_gradients_equal_one_large_batch():
    torch.manual_seed(0)
    x, y = torch.randn(4, 4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = []
    for accum in (1, 2):
        torch.manual_seed(0)
        model = build_model("videofocalnet_nano", **KW)
        for xb, yb in zip(x.chunk(accum), y.chunk(accum)):
            (torch.nn.functional.cross_entropy(model(xb), yb) / accum).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("optim.amp", "fp8", "optim.amp must be bf16, fp16 or off"),
    ("optim.optimizer", "lamb", "optim.optimizer must be adamw or sgd"),
    ("teacher.optim.accum_steps", 0, "teacher.optim.accum_steps must be >= 1"),
    ("optim.label_smoothing", 1.0, "optim.label_smoothing must be in"),
    ("data.val_fraction", 1.0, "data.val_fraction must be in"),
])
def test_new_options_are_validated_naming_the_field(tmp_path, field, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(tmp_path, [(field, value)])
