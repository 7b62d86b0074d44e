"""Tests of the efficiency profile (dvfl.profile, `dvfl profile` = pipelines/profile_model.py)."""
import json
import mmap
import os
import re
import statistics
import subprocess
import sys
import time

import pytest
import torch

from conftest import cli_in_process, linux_only
from dvfl.models import build_model
from dvfl.profile import (
    count_flops, count_params, default_device, profile_model,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "..", "shared", "reference", "video_focalnet_reference.json")
TINY = dict(num_classes=5, num_frames=2, img_size=32, embed_dim=16)


@pytest.fixture(scope="module")
def reference():
    # the reference facts sit in ../shared beside every checkout (CI included): missing is a failure
    assert os.path.exists(REFERENCE), f"reference file not found: {REFERENCE}"
    with open(REFERENCE) as fh:
        return json.load(fh)


@pytest.mark.parametrize("variant", ["nano", "base"])
def test_flops_per_clip_match_reference(reference, variant):
    ref = reference[f"{variant}_101"]["flops_per_clip_8x224"]
    out = count_flops(f"videofocalnet_{variant}", num_classes=101, num_frames=8, img_size=224)
    assert abs(out["flops_per_clip"] / ref - 1.0) <= 0.01, (out, ref)
    assert out["gmacs_per_clip"] == pytest.approx(out["flops_per_clip"] / 2e9)


def test_meta_flop_count_equals_real_forward():
    meta = count_flops("videofocalnet_nano", **TINY, batch=2)
    assert meta["flops_counted_on"] == "meta"
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model("videofocalnet_nano", **TINY).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, TINY["num_frames"], 3, TINY["img_size"], TINY["img_size"]))
    assert meta["flops"] == counter.get_total_flops() > 0
    assert meta["flops_per_clip"] == meta["flops"] / 2


class _Sleeper(torch.nn.Module):
    """A model of known cost: each forward sleeps ``SLEEP_S`` per clip and holds 64 MiB; known
    parameter count and FLOPs (one Linear on the pooled clip)."""
    SLEEP_S = 0.1

    def __init__(self, num_classes=5, num_frames=2, img_size=32, embed_dim=None, **_):
        super().__init__()
        self.head = torch.nn.Linear(3, num_classes)

    def forward(self, x):
        if x.device.type != "meta":
            # 64 MiB of fresh pages, written and held while the forward "runs" (the sleep), so the
            # sampler thread sees them. (A torch tensor may reuse memory a long test process already
            # holds, and then the RSS does not grow.)
            with mmap.mmap(-1, 64 * 2**20) as scratch:
                scratch.write(b"\1" * len(scratch))
                time.sleep(self.SLEEP_S * x.shape[0])
                x = x + scratch[0] - 1
        return self.head(x.mean(dim=(1, 3, 4)))


@pytest.fixture(scope="module")
def sleeper():
    import timm
    from timm.models import register_model

    name = "dvfl_test_sleeper"
    if name not in timm.list_models(name):
        fn = lambda pretrained=False, **kw: _Sleeper(**kw)  # noqa: E731
        fn.__name__ = name
        fn.__module__ = __name__
        register_model(fn)
    return name


def test_profile_model_measures_what_the_model_costs(sleeper):
    batch, tp_batch = 1, 4
    r = profile_model(sleeper, num_classes=5, num_frames=2, img_size=32, batch=batch, warmup=1, repeats=3,
                      throughput_batch=tp_batch, throughput_repeats=2, device="cpu")
    assert r.params == r.trainable_params == 3 * 5 + 5
    assert r.flops_per_clip == 2 * 3 * 5 and r.flops_counted_on == "meta"  # one (1x3)@(3x5) matmul
    # latency: every timed forward slept SLEEP_S (a timer around nothing, or a mean with the
    # warm-up, would not give these); the median and min are of those times
    assert len(r.latency_ms_all) == 3 and min(r.latency_ms_all) >= 1e3 * _Sleeper.SLEEP_S
    assert r.latency_ms_median == statistics.median(r.latency_ms_all) < 1e3 * 10 * _Sleeper.SLEEP_S
    assert r.latency_ms_min == min(r.latency_ms_all)
    # throughput counts clips, not forwards: 4 clips per forward of 4 x SLEEP_S (+ up to 0.5 s to
    # fill the scratch on a busy machine); forwards per second would be at most 1 / (4 x SLEEP_S)
    assert tp_batch / (tp_batch * _Sleeper.SLEEP_S + 0.5) < r.throughput_clips_per_s <= 1.0 / _Sleeper.SLEEP_S
    assert r.throughput_batch == tp_batch
    # the 64 MiB held during each forward is seen (sampled during the forwards, not after)
    assert r.peak_memory_kind == "cpu_rss" and r.peak_memory_delta_mib >= 60
    assert r.peak_memory_mib >= r.peak_memory_delta_mib and r.device == "cpu"


def test_profile_model_small_config():
    r = profile_model("videofocalnet_nano", **TINY, batch=1, warmup=1, repeats=3,
                      throughput_batch=2, throughput_repeats=1, device="cpu")
    assert r.params == count_params(build_model("videofocalnet_nano", **TINY))["params"]
    assert r.flops_per_clip == count_flops("videofocalnet_nano", **TINY)["flops_per_clip"] > 0
    assert r.embed_dim == 16 and len(r.latency_ms_all) == 3


def test_default_device_prefers_cuda(monkeypatch):
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    # the preference itself, on a machine without a GPU too: CUDA whenever torch reports one
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_device() == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")


def test_rss_sampler_sees_torch_allocations():
    # in a fresh process: in a test worker, memory that earlier tests' threads free while the
    # sampler runs lowers the RSS as much as the tensor raises it (seen: +66 MiB for 256 MiB)
    code = ("import torch\nfrom dvfl.profile import RssSampler\nwith RssSampler() as rss:\n"
            "    big = torch.ones(64 * 2**20)  # 256 MiB of float32, written so the pages are resident\n"
            "print(rss.delta)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) >= 200 * 2**20, proc.stdout


def test_rss_is_read_without_proc_and_psutil_as_on_a_mac(monkeypatch):
    """macOS has no /proc (and psutil is not a dependency): `dvfl profile` ended in a traceback."""
    import builtins
    import resource

    from dvfl import profile

    real_import, real_exists = builtins.__import__, os.path.exists
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "psutil" else real_import(name, *a, **k))
    monkeypatch.setattr(os.path, "exists", lambda p: False if str(p).startswith("/proc/") else real_exists(p))
    read = profile._rss_reader()
    assert read() == resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 > 0  # (Linux: KiB)


def test_profile_cli_smoke(tmp_path):
    out_json = tmp_path / "p.json"
    cmd = [sys.executable, os.path.join(ROOT, "pipelines", "profile_model.py"),
           "--arch", "videofocalnet_nano", "--frames", "2", "--size", "32", "--num-classes", "5",
           "--embed-dim", "16", "--batch-size", "1", "--repeats", "2", "--warmup", "1",
           "--throughput-repeats", "1", "--json", str(out_json)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for field in ("params:", "FLOPs per clip:", "GMACs per clip:", "latency (batch 1",
                  "throughput", "peak memory:", "device:"):
        assert field in text, text
    data = json.loads(out_json.read_text())
    expected = count_params(build_model("videofocalnet_nano", **TINY))["params"]
    assert data["params"] == expected
    assert f"params: {expected:,}" in text
    flops = int(re.search(r"FLOPs per clip: ([\d,]+)", text).group(1).replace(",", ""))
    assert flops == data["flops_per_clip"] > 0
    gmacs = float(re.search(r"GMACs per clip: ([\d.e-]+)", text).group(1))
    assert gmacs == pytest.approx(flops / 2e9, rel=0.005)  # (3 significant figures: 0.00 before for a tiny model)
    assert data["latency_ms_median"] > 0 and data["throughput_clips_per_s"] > 0
    # the machine it ran on: the host CPU's model, next to device and threads
    assert isinstance(data["cpu_model"], str) and data["cpu_model"].strip()
    assert f"cpu: {data['cpu_model']}" in text
    assert "path: temporal conv1d (the official one)\n" in text and data["allocator"] == "default"


def test_profile_of_a_trained_models_folder_uses_its_architecture_and_sizes(tmp_path):
    """--model was an old spelling of --arch: a student's folder (as predict and export take it) was
    refused as an unknown architecture; the defaults profiled a 224-px, 101-class model instead."""
    out = tmp_path / "p.json"
    proc = cli_in_process("profile_model.py", "--model", os.path.join(ROOT, "models", "embedded_teacher"), "--repeats", "1",
                          "--warmup", "0", "--throughput-repeats", "0", "--threads", "1", "--json", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    spec = json.loads(open(os.path.join(ROOT, "models", "embedded_teacher", "model.json")).read())
    k = spec["kwargs"]
    assert (f"model: {spec['name']} (num_classes={k['num_classes']}, frames={k['num_frames']}, "
            f"size={spec['inputs']['crop_size']}, embed_dim={k['embed_dim']})") in proc.stdout, proc.stdout
    # timed as predict and Serve run it, and said so (the allocator setting made up to 1.18x; session 47)
    assert "path: temporal conv2d (what predict and Serve run), freed memory kept for reuse" in proc.stdout, proc.stdout
    assert {k: json.loads(out.read_text())[k] for k in ("temporal_impl", "allocator")} == \
        {"temporal_impl": "conv2d", "allocator": "kept"}
    proc = cli_in_process("profile_model.py", "--model", tmp_path)
    assert proc.returncode == 2 and f"--model {tmp_path}: not a model folder (no model.json)" in proc.stderr
    # the old spelling (--model NAME for --arch NAME) still works, with one warning line
    proc = cli_in_process("profile_model.py", "--model", "videofocalnet_nano", "--size", "32", "--num-classes", "4",
                          "--repeats", "1", "--warmup", "0", "--throughput-repeats", "0", "--threads", "1")
    assert proc.returncode == 0 and "model: videofocalnet_nano (num_classes=4, frames=8, size=32)" in proc.stdout
    assert proc.stderr == "warning: --model NAME is deprecated; use --arch NAME (--model takes a model folder)\n"


def test_the_old_model_name_spelling_profiles_what_arch_does(monkeypatch):
    """`profile --model NAME` timed the Conv2d temporal path (a model folder's, as predict runs it)
    where `--arch NAME` times the Conv1d one: the same name, other latencies."""
    import dvfl.profile

    real, seen = dvfl.profile.profile_model, []
    monkeypatch.setattr(dvfl.profile, "profile_model",
                        lambda arch, **kw: seen.append((arch, kw["temporal_impl"])) or real(arch, **kw))
    for flag in ("--arch", "--model"):
        proc = cli_in_process("profile_model.py", flag, "videofocalnet_nano", "--size", "32", "--num-classes", "4",
                              "--repeats", "1", "--warmup", "0", "--throughput-repeats", "0", "--threads", "1")
        assert proc.returncode == 0, proc.stderr
    assert seen == [("videofocalnet_nano", "conv1d")] * 2, seen


def test_profile_cli_rejects_bad_args():
    proc = cli_in_process("profile_model.py", "--repeats", "0")
    assert proc.returncode != 0 and "--repeats" in proc.stderr
    # a traceback after the model was built (threads, warm-up), or silently another batch (throughput 0)
    for args, said in ((["--threads", "0"], "--threads must be >= 1"), (["--warmup", "-1"], "--warmup must be >= 0"),
                       (["--throughput-batch-size", "0"], "--throughput-batch-size must be >= 1")):
        proc = cli_in_process("profile_model.py", *args)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    # a misspelt variant and a device this machine lacks: one line each, not a traceback (session 34)
    for args, said in ((["--arch", "videofocalnet_nan"], "--arch 'videofocalnet_nan': choose one of videofocalnet_base"),
                       (["--device", "gpu"], "--device 'gpu': ")):
        proc = cli_in_process("profile_model.py", *args)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@linux_only
def test_the_cpu_count_honours_a_containers_quota(tmp_path, monkeypatch):
    """os.cpu_count() counts the host's cores: a 4-CPU pod on a 64-core node sized a local Ray of
    128 CPUs, 65 decode tasks and 64 torch threads. The quota (cgroup v2 or v1) caps it."""
    from dvfl import host

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert host.cgroup_cpu_quota(str(v2)) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert host.cgroup_cpu_quota(str(v2)) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert host.cgroup_cpu_quota(str(v1)) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert host.cgroup_cpu_quota(str(v1)) == 4.0
    assert host.cgroup_cpu_quota(str(tmp_path / "none")) is None
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(host, "cgroup_cpu_quota", lambda: 0.5)
    assert host.usable_cpus() == 1  # (rounded up: never 0)
    monkeypatch.setattr(host, "cgroup_cpu_quota", lambda: affinity + 8.0)
    assert host.usable_cpus() == affinity  # the affinity caps a larger quota
