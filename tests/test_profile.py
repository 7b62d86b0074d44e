"""Tests of the efficiency profile (dvfl.profile, pipelines/profile.py)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from dvfl.profile import (
    RssSampler, build_model, count_flops, count_params, default_device, profile_model,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, "..", "shared", "reference", "video_focalnet_reference.json")
TINY = dict(num_classes=5, frames=2, size=32, embed_dim=16)


@pytest.fixture(scope="module")
def reference():
    # the reference facts sit in ../shared beside every checkout (CI included): missing is a failure
    assert os.path.exists(REFERENCE), f"reference file not found: {REFERENCE}"
    with open(REFERENCE) as fh:
        return json.load(fh)


@pytest.mark.parametrize("variant", ["nano", "base"])
def test_flops_per_clip_match_reference(reference, variant):
    ref = reference[f"{variant}_101"]["flops_per_clip_8x224"]
    out = count_flops(f"videofocalnet_{variant}", num_classes=101, frames=8, size=224)
    assert abs(out["flops_per_clip"] / ref - 1.0) <= 0.01, (out, ref)
    assert out["gmacs_per_clip"] == pytest.approx(out["flops_per_clip"] / 2e9)


def test_meta_flop_count_equals_real_forward():
    meta = count_flops("videofocalnet_nano", **TINY, batch=2)
    assert meta["flops_counted_on"] == "meta"
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model("videofocalnet_nano", **TINY).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, TINY["frames"], 3, TINY["size"], TINY["size"]))
    assert meta["flops"] == counter.get_total_flops() > 0
    assert meta["flops_per_clip"] == meta["flops"] / 2


def test_profile_model_small_config():
    r = profile_model("videofocalnet_nano", **TINY, batch=1, warmup=1, repeats=3,
                      throughput_batch=2, throughput_repeats=1, device="cpu")
    assert r.params == count_params(build_model("videofocalnet_nano", **TINY))["params"]
    assert r.latency_ms_median > 0 and len(r.latency_ms_all) == 3
    assert r.throughput_clips_per_s > 0 and r.throughput_batch == 2
    assert r.peak_memory_kind == "cpu_rss" and r.peak_memory_mib > 0
    assert r.device == "cpu" and r.embed_dim == 16


def test_default_device_prefers_cuda():
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_rss_sampler_sees_torch_allocations():
    with RssSampler() as rss:
        big = torch.ones(64 * 2**20)  # 256 MiB of float32, written so the pages are resident
    del big
    assert rss.delta >= 200 * 2**20, rss.delta


def test_profile_cli_smoke(tmp_path):
    out_json = tmp_path / "p.json"
    cmd = [sys.executable, os.path.join(ROOT, "pipelines", "profile.py"),
           "--model", "videofocalnet_nano", "--frames", "2", "--size", "32", "--num-classes", "5",
           "--embed-dim", "16", "--batch", "1", "--repeats", "2", "--warmup", "1",
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
    gmacs = float(re.search(r"GMACs per clip: ([\d.]+)", text).group(1))
    assert gmacs == pytest.approx(flops / 2e9, abs=0.01)
    assert data["latency_ms_median"] > 0 and data["throughput_clips_per_s"] > 0


def test_profile_cli_rejects_bad_args():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "pipelines", "profile.py"),
                           "--repeats", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--repeats" in proc.stderr
