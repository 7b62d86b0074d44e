"""The Video-FocalNet family against the official architecture's reference facts."""
import json
from pathlib import Path

import pytest
import timm
import torch

import dvfl.models  # noqa: F401  (registers the variants with timm)
from dvfl.models import CheckpointError, VideoFocalNet, init_from_image_focalnet, load_checkpoint

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
REFERENCE = json.loads((REFERENCE_DIR / "video_focalnet_reference.json").read_text())
GOLDEN = REFERENCE_DIR / "video_focalnet_golden_tiny.pt"
VARIANTS = ["nano", "tiny", "small", "base"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("num_classes", [101, 400])
def test_param_counts_match_official(variant, num_classes):
    with torch.device("meta"):  # counts and shapes need no memory or init time
        model = timm.create_model(f"videofocalnet_{variant}", num_classes=num_classes, num_frames=8)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_params == REFERENCE[f"{variant}_{num_classes}"]["params"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_layout_matches_official(variant):
    with torch.device("meta"):
        model = timm.create_model(f"videofocalnet_{variant}", num_classes=101, num_frames=8)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == REFERENCE[f"{variant}_101"]["state_dict"]


def test_golden_logits_reproduced_with_strict_load():
    golden = torch.load(GOLDEN, weights_only=True)
    model = VideoFocalNet(**golden["config"]).eval()
    model.load_state_dict(golden["state_dict"], strict=True)
    with torch.no_grad():
        logits = model(golden["input"])
    assert logits.shape == golden["logits"].shape
    assert (logits - golden["logits"]).abs().max().item() < 1e-4


def test_every_gradient_has_its_parameters_layout_after_a_strict_load():
    """DDP copies each gradient into a bucket view with its parameter's strides; a gradient laid
    out otherwise makes every worker warn "Grad strides do not match bucket view strides"."""
    golden = torch.load(GOLDEN, weights_only=True)
    model = VideoFocalNet(**golden["config"])
    model.load_state_dict(golden["state_dict"], strict=True)  # the layout survives a checkpoint load
    model(golden["input"]).logsumexp(-1).sum().backward()
    mismatched = {n: (p.stride(), p.grad.stride()) for n, p in model.named_parameters()
                  if p.grad is not None and p.grad.stride() != p.stride()}
    assert not mismatched, mismatched
    assert all(p.grad is not None for p in model.parameters())
    # that layout is invisible to the weights' fingerprint (artefacts and caches keep their keys)
    from dvfl.artifacts import state_dict_fingerprint

    plain = {k: v.clone(memory_format=torch.contiguous_format) for k, v in golden["state_dict"].items()}
    assert state_dict_fingerprint(model.state_dict()) == state_dict_fingerprint(plain)


def test_width_depth_and_frames_are_overridable():
    model = timm.create_model("videofocalnet_nano", num_classes=7, num_frames=4, embed_dim=24, img_size=32)
    assert model.embed_dim == 24 and model.num_features == 24 * 8
    out = model(torch.randn(2, 4, 3, 32, 32))
    assert out.shape == (2, 7)
    with pytest.raises(ValueError, match="num_frames=4"):
        model(torch.randn(2, 8, 3, 32, 32))
    # timm's classifier protocol, as generic timm code calls it (feature extraction, a new head)
    x = torch.randn(2, 4, 3, 32, 32)
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    assert features.shape == (2, model.num_features)
    model.reset_classifier(3, global_pool="avg")
    assert model(x).shape == (2, 3)


def test_frames_are_not_independent():
    # The temporal branch must mix frames: reordering time changes the output, while a
    # per-frame model averaged over frames would be permutation-invariant.
    golden = torch.load(GOLDEN, weights_only=True)
    model = VideoFocalNet(**golden["config"]).eval()
    model.load_state_dict(golden["state_dict"])
    clip = golden["input"]
    with torch.no_grad():
        a, b = model(clip), model(clip[:, [3, 1, 0, 2]])
    assert (a - b).abs().max() > 1e-2


def test_unknown_and_unsupported_kwargs_rejected():
    with pytest.raises(TypeError, match="embed_dims"):
        VideoFocalNet(embed_dims=96)
    with pytest.raises(ValueError, match="use_layerscale"):
        VideoFocalNet(use_layerscale=True)


def _golden_model_and_file(tmp_path, wrap=True):
    golden = torch.load(GOLDEN, weights_only=True)
    path = tmp_path / "official.pth"
    torch.save({"model": golden["state_dict"], "epoch": 3} if wrap else golden["state_dict"], path)
    return golden, path


@pytest.mark.parametrize("wrap", [True, False])
def test_load_official_checkpoint_strictly(tmp_path, wrap):
    golden, path = _golden_model_and_file(tmp_path, wrap)
    model = VideoFocalNet(**golden["config"]).eval()
    report = load_checkpoint(model, path)
    assert len(report.loaded) == len(golden["state_dict"])
    with torch.no_grad():
        assert torch.allclose(model(golden["input"]), golden["logits"], atol=1e-4)


def test_head_size_mismatch_is_an_error_unless_reinit(tmp_path):
    golden, path = _golden_model_and_file(tmp_path)
    config = dict(golden["config"], num_classes=9)
    with pytest.raises(CheckpointError, match="class count differs") as refused:
        load_checkpoint(VideoFocalNet(**config), path)
    # the hint names what a user can type (it named reinit_head=True and --reinit-head, which only `dvfl teacher` has)
    assert "teacher.train.reinit_head or student.reinit_head" in str(refused.value)
    model = VideoFocalNet(**config)
    head_before = model.head.weight.clone()
    report = load_checkpoint(model, path, reinit_head=True)
    assert set(report.skipped) == {"head.weight", "head.bias"}
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.norm.weight, golden["state_dict"]["norm.weight"])


def test_missing_corrupt_and_mismatched_checkpoints_are_clear_errors(tmp_path):
    golden = torch.load(GOLDEN, weights_only=True)
    model = VideoFocalNet(**golden["config"])
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(model, tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(model, corrupt)
    other = tmp_path / "other.pth"
    torch.save({"model": VideoFocalNet(**dict(golden["config"], embed_dim=8)).state_dict()}, other)
    with pytest.raises(CheckpointError, match="does not match the model spec") as err:
        load_checkpoint(model, other)
    assert "class count" not in str(err.value)  # another width, not another head: reinit_head would not help


def test_pickled_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(VideoFocalNet(img_size=32, embed_dim=8, depths=[1, 1, 1, 1], num_classes=3), path)


def test_an_official_trainers_checkpoint_with_its_yacs_config_loads(tmp_path):
    """The official trainer saves {model, optimizer, lr_scheduler, max_accuracy, epoch, config}, its
    config a yacs CfgNode (a dict subclass), which torch's weights-only unpickler refuses: such a
    checkpoint failed to load. Written here by a process that has a yacs-like CfgNode; read here,
    where yacs is not even installed, the weights reproduce the golden logits."""
    import subprocess
    import sys

    golden = torch.load(GOLDEN, weights_only=True)
    torch.save(golden["state_dict"], tmp_path / "sd.pt")
    (tmp_path / "yacs").mkdir()
    (tmp_path / "yacs" / "__init__.py").write_text("")
    (tmp_path / "yacs" / "config.py").write_text(
        "class CfgNode(dict):\n"
        "    def __init__(self, init_dict=None):\n"
        "        super().__init__(init_dict or {})\n"
        "        self.__dict__['__immutable__'] = False\n")
    path = tmp_path / "ckpt_epoch_29.pth"
    subprocess.run([sys.executable, "-c", (
        "import torch; from yacs.config import CfgNode as C; "
        f"sd = torch.load({str(tmp_path / 'sd.pt')!r}, weights_only=True); "
        "torch.save({'model': sd, 'optimizer': {'state': {}, 'param_groups': []}, 'lr_scheduler': {}, "
        "'max_accuracy': 91.2, 'epoch': 29, 'config': C({'MODEL': C({'NAME': 'x', 'DROP_PATH_RATE': 0.1})})}, "
        f"{str(path)!r})")], cwd=tmp_path, check=True)
    with pytest.raises(Exception, match="yacs"):  # what torch alone says
        torch.load(path, weights_only=True)
    model = VideoFocalNet(**golden["config"]).eval()
    load_checkpoint(model, path)
    with torch.no_grad():
        assert (model(golden["input"]) - golden["logits"]).abs().max().item() < 1e-4


def test_init_from_timm_image_focalnet(tmp_path):
    image_model = timm.create_model("focalnet_tiny_srf", pretrained=False)
    path = tmp_path / "focalnet_tiny_srf.pth"
    torch.save(image_model.state_dict(), path)
    video = timm.create_model("videofocalnet_nano", num_classes=101, num_frames=8)
    temporal_before = video.layers[0].blocks[0].modulation.f_temporal.weight.clone()
    report = init_from_image_focalnet(video, path)
    src = image_model.state_dict()
    torch.testing.assert_close(video.patch_embed.proj.weight, src["stem.proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(video.layers[0].downsample.proj.weight, src["layers.1.downsample.proj.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        video.layers[2].blocks[1].modulation.f.weight,
        src["layers.2.blocks.1.modulation.f.weight"].flatten(1), rtol=0, atol=0,
    )
    torch.testing.assert_close(video.layers[3].blocks[0].mlp.fc2.weight, src["layers.3.blocks.0.mlp.fc2.weight"].flatten(1), rtol=0, atol=0)
    # temporal branches have no 2D counterpart and keep their init; nano is shallower than tiny
    assert torch.equal(video.layers[0].blocks[0].modulation.f_temporal.weight, temporal_before)
    assert "layers.0.blocks.0.modulation.f_temporal.weight" in report.missing
    assert report.skipped["layers.0.blocks.1.norm1.weight"] == "no such parameter in the video model"
    assert report.skipped["head.weight"].startswith("shape (1000, 768)")
    assert "layers.2.blocks.1.modulation.f.weight" in report.loaded
    # focal level 3 (the "lrf" files) for a level-2 model: every block's modulation.f stayed random beside the
    # loaded rest, said only as counts
    lrf = tmp_path / "focalnet_tiny_lrf.pth"
    torch.save(timm.create_model("focalnet_tiny_lrf", pretrained=False).state_dict(), lrf)
    with pytest.raises(CheckpointError, match=r"tensors of the model have another shape in the file .*"
                                              r"modulation\.f\.weight \(196, 96\) vs \(195, 96\).*lrf vs srf"):
        init_from_image_focalnet(timm.create_model("videofocalnet_nano", num_classes=101, num_frames=8), lrf)


def test_checkpoints_in_other_wrappers_folders_or_specs_load_or_are_refused_in_one_line(tmp_path):
    """torch.compile over DDP saves `_orig_mod.module.` keys (refused as "a 2D ImageNet FocalNet?"); a model
    folder given as a checkpoint was "not found"; a model.json with `device`/`dtype` kwargs gave a CUDA driver
    traceback on a CPU machine."""
    import json

    from dvfl.artifacts import load_model, save_model
    from dvfl.models.checkpoint import read_state_dict

    golden, path = _golden_model_and_file(tmp_path)
    state = read_state_dict(path)
    wrapped = tmp_path / "compiled_ddp.pth"
    torch.save({f"_orig_mod.module.{k}": v for k, v in state.items()}, wrapped)
    assert read_state_dict(wrapped).keys() == state.keys()
    model = VideoFocalNet(**golden["config"])
    folder = tmp_path / "folder"
    save_model(folder, model, "videofocalnet_nano", golden["config"])
    assert read_state_dict(folder).keys() == model.state_dict().keys()
    from types import SimpleNamespace

    from dvfl.pipeline import init_identity  # (a run's identity reads the folder's weights file)

    assert init_identity(SimpleNamespace(checkpoint=str(folder), init_2d=None, reinit_head=False))["init_weights"][0] == \
        (folder / "model.pt").stat().st_size
    spec = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**spec, "kwargs": {**spec["kwargs"], "device": "cuda"}}))
    with pytest.raises(CheckpointError, match=r"kwargs device say where to build the model"):
        load_model(folder)
    # another variant's weights: named (it said "a 2D ImageNet FocalNet is loaded with --init-2d")
    from dvfl.models import build_model

    tiny = tmp_path / "tiny.pth"
    torch.save(build_model("videofocalnet_tiny", num_classes=10).state_dict(), tiny)
    with pytest.raises(CheckpointError, match=r"the file holds a Video-FocalNet of embed_dim 96 and depths "
                                              r"\[2, 2, 6, 2\] \(videofocalnet_tiny\)$"):
        load_checkpoint(build_model("videofocalnet_nano", num_classes=10), tiny)


def test_timm_create_model_pretrained_from_local_file(tmp_path):
    golden, path = _golden_model_and_file(tmp_path)
    model = timm.create_model("videofocalnet_nano", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                              **{k: v for k, v in golden["config"].items()}).eval()
    with torch.no_grad():
        assert torch.allclose(model(golden["input"]), golden["logits"], atol=1e-4)
    with pytest.raises(ValueError, match="local checkpoint"):
        timm.create_model("videofocalnet_nano", pretrained=True)


def test_timm_create_model_takes_the_checkpoints_classes_device_and_dtype(tmp_path):
    """Through timm: a checkpoint loads without num_classes (the default 1000-class head refused
    every official one, naming a flag timm has not), another num_classes gets a new head as timm's
    own models do, and device/dtype are applied (an fp32 CPU model came back)."""
    import warnings

    golden, path = _golden_model_and_file(tmp_path)
    config = {k: v for k, v in golden["config"].items() if k != "num_classes"}
    classes = golden["config"]["num_classes"]
    model = timm.create_model("videofocalnet_nano", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                              **config).eval()
    assert model.head.out_features == classes
    with torch.no_grad():
        assert torch.allclose(model(golden["input"]), golden["logits"], atol=1e-4)
    with pytest.warns(UserWarning, match=f"its {classes}-class head is not loaded; a new 7-class head"):
        other = timm.create_model("videofocalnet_nano", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                  num_classes=7, **config)
    assert other.head.out_features == 7
    features = timm.create_model("videofocalnet_nano", pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                 num_classes=0, **config)  # timm's feature extractor: no classifier, no warning
    assert torch.equal(features.state_dict()["norm.weight"], model.state_dict()["norm.weight"])
    assert "head.weight" not in features.state_dict()
    headless = tmp_path / "features.pth"
    torch.save(features.state_dict(), headless)  # a checkpoint without a classifier: a feature extractor again
    again = timm.create_model("videofocalnet_nano", pretrained=True, pretrained_cfg_overlay={"file": str(headless)},
                              **config)
    assert again.num_classes == 0 and "head.weight" not in again.state_dict()
    assert torch.equal(other.state_dict()["norm.weight"], model.state_dict()["norm.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        half = timm.create_model("videofocalnet_nano", dtype=torch.bfloat16, device="meta", **config)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and {p.device.type for p in half.parameters()} == {"meta"}


def test_depthwise_convs_on_maps_smaller_than_their_kernel_give_the_plain_convs_outputs_and_gradients(monkeypatch):
    """At 32x32 the late stages run 5x5 depthwise kernels on 2x2 and 1x1 maps: the cropped
    kernel must change nothing but the speed (outputs, every gradient and its layout)."""
    from dvfl.models import build_model
    from dvfl.models import video_focalnet as vf

    torch.manual_seed(0)
    model = build_model("videofocalnet_nano", num_classes=8, num_frames=8, img_size=32, embed_dim=16, depths=[1, 1, 2, 1],
                        drop_path_rate=0.0).eval()
    x = torch.randn(2, 8, 3, 32, 32)

    def run():
        model.zero_grad()
        out = model(x)
        out.logsumexp(-1).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    cropped, cropped_grads = run()
    calls = []
    monkeypatch.setattr(vf, "_depthwise_on_small_map", lambda conv, t: calls.append(t.shape[-2:]) or conv(t))
    plain, plain_grads = run()
    assert {tuple(s) for s in calls} >= {(2, 2), (1, 1)}  # the small maps the crop is for were met
    torch.testing.assert_close(cropped, plain, rtol=1e-5, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cropped_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
        assert cropped_grads[name].stride() == dict(model.named_parameters())[name].stride(), name


def test_an_odd_map_rounds_down_as_in_the_official_model():
    """The official PatchEmbed convolves without padding, so at 112 px the last stage sees 3x3 (7 // 2).
    Ours zero-padded odd maps (4x4): other logits from the same weights and 7.21 GMACs for the nano
    instead of the official 6.42. A map smaller than the patch (24 px inputs, where the official
    model fails) is still padded to one patch."""
    from dvfl.profile import count_flops

    seen = []
    model = VideoFocalNet(img_size=112, embed_dim=16, depths=[1, 1, 1, 1], num_frames=4).eval()
    model.layers[3].blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[1:])))
    with torch.inference_mode():
        model(torch.randn(1, 4, 3, 112, 112))
    assert seen == [(3, 3)]
    assert count_flops("videofocalnet_nano", img_size=112)["gmacs_per_clip"] == pytest.approx(6.4164288)
    with torch.inference_mode():
        assert VideoFocalNet(img_size=24, embed_dim=16, depths=[1, 1, 1, 1], num_frames=4, num_classes=5)(
            torch.randn(1, 4, 3, 24, 24)).shape == (1, 5)


def test_the_official_constructors_keywords_are_accepted_at_their_defaults():
    """An official config's keywords pass straight through; only other values are refused."""
    VideoFocalNet(depths=[1] * 4, embed_dim=8, img_size=32, tubelet_size=1, layerscale_value=1e-4,
                  norm_layer=torch.nn.LayerNorm)
    with pytest.raises(ValueError, match="tubelet_size=2 is not supported"):
        VideoFocalNet(depths=[1] * 4, embed_dim=8, img_size=32, tubelet_size=2)
