"""The training loop's speed levers (issue 25) give the plain path's outputs and losses."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import linux_only
from dvfl.models import build_model
from dvfl.config import ConfigError, OptimSection, load_config
from dvfl.models import VideoFocalNet
from dvfl.models import set_temporal_impl
from dvfl.train.loop import amp_dtype, bf16_autocast_pays, cpu_has_bf16, cpu_vendor_and_flags, make_optimizer

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "reference" / "video_focalnet_golden_tiny.pt"


def test_temporal_conv2d_gives_the_official_conv1d_outputs_and_gradients():
    golden = torch.load(GOLDEN, weights_only=True)
    grads, outputs = {}, {}
    for impl in ("conv1d", "conv2d"):
        model = VideoFocalNet(**golden["config"])
        model.load_state_dict(golden["state_dict"], strict=True)
        set_temporal_impl(model, impl)
        out = model(golden["input"])
        out.logsumexp(-1).sum().backward()
        outputs[impl] = out.detach()
        grads[impl] = {n: p.grad for n, p in model.named_parameters()}
        # DDP needs each gradient in its parameter's layout (see test_models.py)
        assert all(p.grad.stride() == p.stride() for p in model.parameters()), impl
    assert (outputs["conv1d"] - golden["logits"]).abs().max() < 1e-4  # conv1d is the official math
    assert (outputs["conv2d"] - outputs["conv1d"]).abs().max() < 1e-5
    worst = max(((grads["conv2d"][n] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                for n, g in grads["conv1d"].items())
    assert worst < 1e-4
    temporal = [n for n in grads["conv1d"] if "focal_layers_temporal" in n or "h_temporal" in n]
    assert temporal and all(grads["conv2d"][n].abs().sum() > 0 for n in temporal)  # the path is trained


def _embedded_student():
    """The embedded default's student (architecture, size, learning rate)."""
    from dvfl.pipeline import model_kwargs

    cfg = load_config(None)
    return model_kwargs(cfg.student, cfg.data.synthetic.num_classes, cfg), cfg.optim.lr


def _steps(opt_cfg, n=3, amp=False, seed=0, impl="conv2d"):
    """Losses of ``n`` AdamW steps of the embedded default's student on a fixed batch."""
    kwargs, lr = _embedded_student()
    torch.manual_seed(seed)
    model = build_model("videofocalnet_nano", **kwargs)
    set_temporal_impl(model, impl)
    opt = make_optimizer(model, OptimSection(lr=lr, weight_decay=0.05, **opt_cfg))
    g = torch.Generator().manual_seed(100)
    size, classes = kwargs["img_size"], kwargs["num_classes"]
    x, y = torch.randn(8, 8, 3, size, size, generator=g), torch.randint(0, classes, (8,), generator=g)
    losses = []
    for _ in range(n):
        torch.manual_seed(seed * 100 + len(losses))  # stochastic depth: the same draws with and without bf16
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, model


def test_fused_optimizer_takes_the_unfused_steps():
    plain, m_plain = _steps({"fused": False})
    fused, m_fused = _steps({"fused": True})
    assert torch.optim.AdamW in type(make_optimizer(m_fused, OptimSection(lr=1e-3, weight_decay=0.0, fused=True))).__mro__
    assert make_optimizer(m_fused, OptimSection(lr=1e-3, weight_decay=0.0, fused=True)).defaults["fused"] is True
    assert max(abs(a - b) for a, b in zip(plain, fused)) < 1e-5
    for (n, a), b in zip(m_plain.named_parameters(), m_fused.parameters()):
        assert (a - b).abs().max() < 1e-5, n


def test_bf16_autocast_losses_stay_within_seed_noise():
    """A few steps of the student with and without bf16 autocast: their difference is smaller
    than the difference between two seeds of the fp32 run (the curve is unchanged within noise)."""
    fp32_0, _ = _steps({"fused": True}, n=4)
    fp32_1, _ = _steps({"fused": True}, n=4, seed=1)
    bf16_0, _ = _steps({"fused": True}, n=4, amp=True)
    seed_noise = max(abs(a - b) for a, b in zip(fp32_0, fp32_1))
    assert max(abs(a - b) for a, b in zip(fp32_0, bf16_0)) < seed_noise / 2
    assert fp32_0[-1] < fp32_0[0] and bf16_0[-1] < bf16_0[0]  # both learn


def test_cpu_bf16_autocast_only_where_the_cpu_has_bf16_instructions_that_pay(tmp_path):
    cpu = torch.device("cpu")
    assert amp_dtype(cpu, "bf16", cpu_amp=True) == (
        torch.bfloat16 if bf16_autocast_pays(*cpu_vendor_and_flags()) else None)
    if not cpu_has_bf16():
        assert amp_dtype(cpu, "bf16", cpu_amp=True) is None
    # /proc/cpuinfo's lines as Linux writes them (flags abridged), and what each CPU trains in
    cpus = {("GenuineIntel", "fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"): True,  # a Xeon with AMX
            ("GenuineIntel", "fpu avx512f avx512_bf16 avx512_fp16"): False,  # AMX hidden by the VM: bf16 0.74x
            ("AuthenticAMD", "fpu avx512f avx512_bf16"): True,  # Zen 4
            ("AuthenticAMD", "fpu avx2"): False}  # emulated bf16
    for (vendor, flags), pays in cpus.items():
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                        f"vendor_id\t: {vendor}\nflags\t\t: {flags}\n")
        assert cpu_vendor_and_flags(str(info)) == (vendor, set(flags.split()))
        assert bf16_autocast_pays(*cpu_vendor_and_flags(str(info))) is pays, (vendor, flags)
    assert cpu_vendor_and_flags(str(tmp_path / "missing")) == ("", set())
    assert amp_dtype(cpu, "bf16", cpu_amp=False) is None
    assert amp_dtype(cpu, "off", cpu_amp=True) is None
    assert amp_dtype(cpu, "fp16", cpu_amp=True) in (torch.bfloat16, None)  # never fp16 on a CPU


def test_speed_levers_default_to_the_config_and_are_validated_by_name(tmp_path):
    from dvfl.pipeline import training_loop_config

    # the loop gets the config's own optim section: its levers are the config's, set or default
    cfg = load_config(None, [("output_dir", str(tmp_path)), ("optim.temporal_impl", "conv1d")])
    loop = training_loop_config(cfg, cfg.student, cfg.optim, 3, 0, {"mode": "none"}, tensorboard_dir=None)
    assert loop.optim == cfg.optim and loop.optim.temporal_impl == "conv1d" != OptimSection().temporal_impl
    assert (loop.optim.cpu_amp, loop.optim.fused, loop.optim.keep_freed_memory) == (
        OptimSection().cpu_amp, OptimSection().fused, OptimSection().keep_freed_memory)
    with pytest.raises(ConfigError, match="optim.keep_freed_memory"):
        load_config(None, [("output_dir", str(tmp_path)), ("optim.keep_freed_memory", "3")])
    with pytest.raises(ConfigError, match="optim.temporal_impl"):
        load_config(None, [("output_dir", str(tmp_path)), ("optim.temporal_impl", "fft")]).validate(check_paths=False)
    with pytest.raises(ConfigError, match="teacher.optim.fused"):
        load_config(None, [("output_dir", str(tmp_path)), ("teacher.optim.fused", "yes")])
    model = build_model("videofocalnet_nano", num_classes=3, num_frames=8, img_size=32, embed_dim=8)
    with pytest.raises(ValueError, match="temporal_impl"):
        set_temporal_impl(model, "fft")


def test_results_record_each_models_training_time_and_dvfl_cost_relative_to_vfl():
    from dvfl.pipeline import summarize, training_cost

    def row(epochs, seconds):
        return {"top1": 0.5, "top5": 0.9, "params": 1000, "gmacs": 0.01, "split": "test",
                "history": [{"epoch": i + 1, "epoch_seconds": s} for i, s in enumerate(epochs)],
                "train_seconds": seconds}

    # the median, not the mean: a slow first epoch (start-up, warm-up) does not count
    table = {"vfl": summarize([row([30.0, 10.0, 12.0], 100.0)]),
             "dvfl": summarize([row([31.0, 12.6, 10.5], 110.0)])}
    assert table["vfl"]["train_seconds_per_seed"] == [100.0]
    assert table["dvfl"]["median_epoch_seconds_per_seed"] == [12.6]
    cost = training_cost(table)
    assert cost["dvfl_over_vfl_epoch"] == pytest.approx([1.05])
    assert cost["dvfl_over_vfl_run"] == pytest.approx([1.1])
    # a resumed run: its earlier command's epochs (finished before this command began) are counted too;
    # a restart within the command is in its own seconds already (its run's train_seconds was one epoch's)
    from dvfl.pipeline import whole_run_seconds

    history = [{"epoch_seconds": 10.0, "val_seconds": 1.0, "command_started": 1000.0} for _ in range(3)]
    history += [{"epoch_seconds": 10.0, "val_seconds": 1.0, "command_started": 5000.0} for _ in range(2)]
    assert whole_run_seconds(history, 30.0, 5000.0) == pytest.approx(30.0 + 33.0)
    assert whole_run_seconds(history[:3], 40.0, 1000.0) == 40.0  # one command, a restart within it included
    assert whole_run_seconds([{"epoch_seconds": 5.0}], 7.0, 100.0) == 7.0  # (histories before session 47)
    # a model from before train_seconds was recorded: no made-up ratio
    table["vfl"] = summarize([{**row([10.0], 1.0), "train_seconds": None}])
    assert training_cost(table) is None


def test_depthwise_convs_run_in_fp32_under_cpu_autocast():
    """oneDNN's bf16 depthwise weight gradient is 3-5x slower than fp32's: under CPU autocast the
    focal levels' depthwise convs take fp32 inputs and give the fp32 conv's outputs, and every
    gradient of the model keeps its parameter's layout (as DDP needs)."""
    from dvfl.models.video_focalnet import _depthwise

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 5, padding=2, groups=16, bias=False)
    x = torch.randn(4, 16, 14, 14).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _depthwise(conv, x.bfloat16())
        plain = conv(x.bfloat16())  # what autocast alone would run
    assert out.dtype == torch.float32 and plain.dtype == torch.bfloat16
    assert torch.equal(out, conv(x.bfloat16().float()))
    assert torch.equal(_depthwise(conv, x), conv(x))  # outside autocast: the plain conv

    model = build_model("videofocalnet_nano", num_classes=5, num_frames=8, img_size=32, embed_dim=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 8, 3, 32, 32)).float().logsumexp(-1).sum().backward()
    depthwise = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise and all(w.grad.dtype == torch.float32 and w.grad.abs().sum() > 0 for w in depthwise)
    assert all(p.grad.stride() == p.stride() for p in model.parameters() if p.grad is not None)


def _page_faults_of_reallocating(nbytes: int) -> int:
    """Page faults of writing a block of ``nbytes`` malloc'd right after an equal one was freed.
    glibc's malloc itself, as the setting controls it: through torch the count also followed the
    process's history (session 43, an AMD EPYC: 0 faults under glibc's settings in some test
    processes, every page in others, with the setting on or off)."""
    import ctypes
    import ctypes.util
    import resource

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    block = libc.malloc(nbytes)
    ctypes.memset(block, 1, nbytes)
    libc.free(block)  # handed back to the kernel, or kept
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(nbytes)
    ctypes.memset(block, 1, nbytes)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    libc.free(block)
    return faults


@linux_only
def test_keep_freed_memory_lets_the_next_step_reuse_freed_pages():
    """A freed 48 MiB block comes back without page faults once glibc keeps freed memory
    (dvfl/allocator.py); with glibc's settings every page faults again. Measured in a fresh process:
    in the test process a free hole an earlier test left in the heap served the block without a
    fault under glibc's settings too (0 faults; session 48)."""
    import inspect
    import json
    import resource
    import subprocess
    import sys

    code = inspect.getsource(_page_faults_of_reallocating) + """
import ctypes, ctypes.util, json
from dvfl.allocator import keep_freed_memory
nbytes = 48 << 20
assert keep_freed_memory(False)  # Linux/glibc, as this project's machines
default = _page_faults_of_reallocating(nbytes)
assert keep_freed_memory(True)
_page_faults_of_reallocating(nbytes)  # the first one grows the heap
print(json.dumps([default, _page_faults_of_reallocating(nbytes)]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    default, kept = json.loads(r.stdout.strip().splitlines()[-1])
    pages = (48 << 20) // resource.getpagesize()
    assert default > pages // 2 and kept < pages // 20, (default, kept)
