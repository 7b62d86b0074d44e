"""Video-FocalNet: FocalNet with spatio-temporal focal modulation.

One file for the whole family (nano / tiny / small / base), in the spirit of timm's model files.
Module and parameter names follow the official implementation exactly, so an official
Video-FocalNet or DVFL-Net checkpoint loads with ``strict=True`` and no key renaming.

Layout conventions:
  * The model takes clips as ``(B, T, C, H, W)``. Frames are folded into the batch as
    ``(B*T, ...)`` with the batch index outermost, and every spatial op runs per frame.
  * Only the temporal branch of each modulation block sees the time axis; it works per spatial
    location on sequences of length T. Time is never downsampled.
"""
from __future__ import annotations

import contextlib
import os
import warnings

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from timm.layers import DropPath, trunc_normal_
from timm.models import register_model

__all__ = [
    "VideoFocalNet",
    "SpatioTemporalFocalModulation",
    "TEMPORAL_IMPLS",
    "VARIANTS",
    "set_temporal_impl",
    "videofocalnet_nano",
    "videofocalnet_tiny",
    "videofocalnet_small",
    "videofocalnet_base",
]


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class SpatioTemporalFocalModulation(nn.Module):
    """Focal modulation with a spatial path (per frame) and a temporal path (per location).

    Spatial path (FocalNet): ``f`` projects to query, context and L+1 gates; the context goes
    through L chained depthwise convs (growing kernels) and a global level (GELU of the mean);
    the gated sum is mixed by the 1x1 conv ``h`` into the spatial modulator.
    Temporal path: ``f_temporal`` projects to context and L+1 gates; L chained dense Conv1d over
    time plus a global level; the gated sum is mixed by ``h_temporal``.
    Output: ``proj(q * m_spatial * m_temporal)``.
    """

    def __init__(
        self,
        dim: int,
        num_frames: int,
        focal_level: int = 2,
        focal_window: int = 3,
        focal_factor: int = 2,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.num_frames = num_frames
        self.focal_level = focal_level
        n_gates = focal_level + 1

        self.f = nn.Linear(dim, 2 * dim + n_gates)
        self.h = nn.Conv2d(dim, dim, kernel_size=1)
        self.f_temporal = nn.Linear(dim, dim + n_gates)
        self.h_temporal = nn.Conv1d(dim, dim, kernel_size=1)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        self.focal_layers = nn.ModuleList()
        self.focal_layers_temporal = nn.ModuleList()
        for level in range(focal_level):
            k = focal_factor * level + focal_window
            self.focal_layers.append(
                nn.Sequential(
                    nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False), nn.GELU()
                )
            )
            self.focal_layers_temporal.append(
                nn.Sequential(nn.Conv1d(dim, dim, k, padding=k // 2, bias=False), nn.GELU())
            )
        for conv in (self.h, *(layer[0] for layer in self.focal_layers)):
            _channels_last_weight(conv)
        # how the temporal path runs (same parameters, same math; see ``_temporal_modulator``)
        self.temporal_impl = "conv1d"

    def _aggregate(self, ctx: torch.Tensor, gates: torch.Tensor, layers: nn.ModuleList, reduce_dims):
        """Gated sum over the L local levels and the global level (channels-first tensors)."""
        ctx_all = 0
        for level, (conv, act) in enumerate(layers):
            ctx = act(_depthwise(conv, ctx) if conv.groups > 1 else conv(ctx))
            ctx_all = ctx_all + ctx * gates[:, level : level + 1]
        ctx_global = self.act(ctx.mean(dim=reduce_dims, keepdim=True))
        return ctx_all + ctx_global * gates[:, self.focal_level :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B*T, H, W, C)`` channels-last frame features."""
        bt, height, width, dim = x.shape
        n_gates = self.focal_level + 1

        # Spatial path, per frame.
        q, ctx, gates = torch.split(self.f(x).permute(0, 3, 1, 2), (dim, dim, n_gates), dim=1)
        m_spatial = self.h(self._aggregate(ctx, gates, self.focal_layers, (2, 3)))

        m_temporal = self._temporal_modulator(x)
        out = (q * m_spatial * m_temporal).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))

    def _temporal_modulator(self, x: torch.Tensor) -> torch.Tensor:
        """Temporal path, per spatial location on sequences of length T -> ``(B*T, C, H, W)``.

        ``conv1d`` (the model's default) is the official formulation; the training loop uses ``conv2d``
        (``optim.temporal_impl``). ``conv2d`` runs each Conv1d over time
        as a ``(k, 1)`` Conv2d on a channels-last ``(B, C, T, H*W)`` view of the features: no
        transposes to and from ``(B*H*W, C, T)``, and oneDNN's channels-last dense kernels (AMX
        under bf16). Both give the same outputs and gradients.
        """
        bt, height, width, dim = x.shape
        n_gates, frames = self.focal_level + 1, self.num_frames
        if self.temporal_impl == "conv1d":
            xt = rearrange(self.f_temporal(x), "(b t) h w c -> (b h w) c t", t=frames)
            ctx_t, gates_t = torch.split(xt, (dim, n_gates), dim=1)
            m_temporal = self.h_temporal(self._aggregate(ctx_t, gates_t, self.focal_layers_temporal, 2))
            return rearrange(m_temporal, "(b h w) c t -> (b t) c h w", h=height, w=width, t=frames)
        if self.temporal_impl != "conv2d":
            raise ValueError(f"temporal_impl must be conv2d or conv1d, got {self.temporal_impl!r}")
        # (B*T, H, W, C') -> channels-last view (B, C', T, H*W): the same memory, no copy
        xt = self.f_temporal(x).view(bt // frames, frames, height * width, dim + n_gates).permute(0, 3, 1, 2)
        ctx, gates = xt[:, :dim], xt[:, dim:]
        ctx_all = 0
        for level, (conv, act) in enumerate(self.focal_layers_temporal):
            ctx = act(F.conv2d(ctx, conv.weight.unsqueeze(-1), padding=(conv.padding[0], 0)))
            ctx_all = ctx_all + ctx * gates[:, level : level + 1]
        ctx_all = ctx_all + self.act(ctx.mean(dim=2, keepdim=True)) * gates[:, self.focal_level :]
        # the 1x1 mix as a matmul on (B, T, H*W, C): its weight gradient keeps the Conv1d's strides
        m = F.linear(ctx_all.permute(0, 2, 3, 1), self.h_temporal.weight.squeeze(-1), self.h_temporal.bias)
        return m.reshape(bt, height, width, dim).permute(0, 3, 1, 2)  # channels-last (B*T, C, H, W)


TEMPORAL_IMPLS = ("conv1d", "conv2d")


def set_temporal_impl(model: nn.Module, impl: str) -> None:
    """How every focal-modulation block runs its temporal path (same parameters, same outputs):
    ``conv1d`` (official) or ``conv2d`` (see ``SpatioTemporalFocalModulation._temporal_modulator``)."""
    if impl not in TEMPORAL_IMPLS:
        raise ValueError(f"temporal_impl must be conv2d or conv1d, got {impl!r}")
    for module in model.modules():
        if isinstance(module, SpatioTemporalFocalModulation):
            module.temporal_impl = impl


class FocalModulationBlock(nn.Module):
    """Pre-norm block: x + DropPath(modulation(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(
        self,
        dim: int,
        num_frames: int,
        focal_level: int,
        focal_window: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = SpatioTemporalFocalModulation(
            dim, num_frames, focal_level=focal_level, focal_window=focal_window, proj_drop=drop
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        bt, n_tokens, dim = x.shape
        y = self.modulation(self.norm1(x).view(bt, height, width, dim)).view(bt, n_tokens, dim)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patchify conv + LayerNorm; the stem (4x4) and each downsample (2x2)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor):
        """x: ``(N, C, H, W)`` -> tokens ``(N, H'*W', C')`` and the new ``(H', W')``."""
        # as the official model: an odd map rounds down (7x7 -> 3x3 at 112 px); only a map smaller
        # than the patch, where the official model fails (24 px inputs), is zero-padded to one patch
        p = self.patch_size
        pad_h, pad_w = max(0, p - x.shape[2]), max(0, p - x.shape[3])
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.proj(x)
        height, width = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks at constant width, then an optional 2x2 downsample."""

    def __init__(
        self,
        dim: int,
        out_dim: int | None,
        depth: int,
        num_frames: int,
        focal_level: int,
        focal_window: int,
        mlp_ratio: float,
        drop: float,
        drop_path: Sequence[float],
        use_checkpoint: bool = False,
    ):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.blocks = nn.ModuleList(
            FocalModulationBlock(
                dim, num_frames, focal_level, focal_window, mlp_ratio, drop, drop_path[i]
            )
            for i in range(depth)
        )
        self.downsample = PatchEmbed(2, dim, out_dim) if out_dim is not None else None

    def forward(self, x: torch.Tensor, height: int, width: int):
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                # recompute the block's activations in backward instead of keeping them (same math)
                x = torch.utils.checkpoint.checkpoint(block, x, height, width, use_reentrant=False)
            else:
                x = block(x, height, width)
        if self.downsample is not None:
            x = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
            x, height, width = self.downsample(x)
        return x, height, width


class VideoFocalNet(nn.Module):
    """Video-FocalNet classifier. Input ``(B, T, C, H, W)``, output logits ``(B, num_classes)``.

    Constructor keywords follow the official model (``img_size``, ``patch_size``, ``in_chans``,
    ``num_classes``, ``embed_dim``, ``depths``, ``mlp_ratio``, ``drop_rate``, ``drop_path_rate``,
    ``focal_levels``, ``focal_windows``, ``num_frames``); official-only switches that change the
    architecture away from the released variants are rejected rather than silently ignored.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        focal_levels: Sequence[int] = (2, 2, 2, 2),
        focal_windows: Sequence[int] = (3, 3, 3, 3),
        num_frames: int = 8,
        use_checkpoint: bool = False,
        **unsupported,
    ):
        super().__init__()
        _reject_unsupported(unsupported)
        if not (len(depths) == len(focal_levels) == len(focal_windows)):
            raise ValueError(
                f"depths, focal_levels and focal_windows need one entry per stage, got "
                f"{list(depths)}, {list(focal_levels)}, {list(focal_windows)}"
            )
        if embed_dim <= 0 or num_frames <= 0 or num_classes < 0:
            raise ValueError(
                f"embed_dim and num_frames must be positive and num_classes >= 0, got "
                f"embed_dim={embed_dim}, num_frames={num_frames}, num_classes={num_classes}"
            )
        self.img_size = img_size
        self.num_frames = num_frames
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.depths = list(depths)
        num_stages = len(depths)
        dims = [embed_dim * 2**i for i in range(num_stages)]
        self.num_features = dims[-1]

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_drop = nn.Dropout(drop_rate)
        total = sum(depths)  # stochastic depth grows linearly with block index
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        for i in range(num_stages):
            start = sum(depths[:i])
            self.layers.append(
                BasicLayer(
                    dims[i],
                    dims[i + 1] if i < num_stages - 1 else None,
                    depths[i],
                    num_frames,
                    focal_levels[i],
                    focal_windows[i],
                    mlp_ratio,
                    drop_rate,
                    rates[start : start + depths[i]],
                    use_checkpoint,
                )
            )
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    # timm classifier protocol
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """(``global_pool`` is timm's signature: pooling here is always the mean over tokens and frames.)"""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, C, H, W)`` -> clip features ``(B, num_features)`` (mean over frames)."""
        if x.ndim != 5:
            raise ValueError(f"expected clips of shape (B, T, C, H, W), got {tuple(x.shape)}")
        batch, frames = x.shape[:2]
        if frames != self.num_frames:
            raise ValueError(
                f"model was built for num_frames={self.num_frames}, got clips with {frames} frames"
            )
        x, height, width = self.patch_embed(x.flatten(0, 1))
        x = self.pos_drop(x)
        for layer in self.layers:
            x, height, width = layer(x, height, width)
        x = self.norm(x).mean(dim=1)  # average over tokens, per frame
        return x.view(batch, frames, -1).mean(dim=1)  # then over frames

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return features if pre_logits else self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# Keywords of the official constructor that select variants we do not implement. Accepting and
# ignoring them would build a different network than the caller asked for.
_OFFICIAL_DEFAULTS = {
    "use_conv_embed": False,
    "use_layerscale": False,
    "use_postln": False,
    "use_postln_in_modulation": False,
    "normalize_modulator": False,
    "ape": False,
    "patch_norm": True,
    "layerscale_value": 1e-4,  # (unused without layer scale, as in the official model)
    "tubelet_size": 1,
    "norm_layer": nn.LayerNorm,
}


def _reject_unsupported(kwargs: dict) -> None:
    for key, value in kwargs.items():
        if key in _OFFICIAL_DEFAULTS:
            if value != _OFFICIAL_DEFAULTS[key]:
                raise ValueError(f"{key}={value!r} is not supported (only {_OFFICIAL_DEFAULTS[key]!r})")
            continue
        raise TypeError(f"VideoFocalNet got an unexpected keyword argument {key!r}")


def _depthwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The focal levels' depthwise conv; in fp32 under CPU autocast, where oneDNN's bf16 depthwise
    weight gradient is 3-5x slower than its fp32 one (docs/training-speed.md)."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return _depthwise_on_small_map(conv, x.float())
    return _depthwise_on_small_map(conv, x)


def _depthwise_on_small_map(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A 'same'-padded depthwise conv whose kernel is larger than the map (late stages of small
    inputs: 5x5 kernels on 2x2 or 1x1 maps): only the kernel's central (2H-1)x(2W-1) taps ever
    meet the input, so the conv runs with that crop (on a 1x1 map, a per-channel scale), with the
    same outputs and gradients and far cheaper oneDNN calls (docs/training-speed.md)."""
    height, width = x.shape[-2:]
    kh, kw = conv.weight.shape[-2:]
    ch, cw = min(kh, 2 * height - 1), min(kw, 2 * width - 1)
    if (ch, cw) == (kh, kw) or torch.jit.is_tracing():  # ONNX's tracer cannot size a sliced kernel
        return conv(x)
    top, left = (kh - ch) // 2, (kw - cw) // 2
    # sliced as (C, k, k, 1): the weight's gradient then comes back channels-last, like the weight
    weight = conv.weight.permute(0, 2, 3, 1)[:, top : top + ch, left : left + cw].permute(0, 3, 1, 2)
    if ch == cw == 1:
        return x * weight.reshape(1, -1, 1, 1)
    return F.conv2d(x, weight, padding=(ch // 2, cw // 2), groups=conv.groups)


def _channels_last_weight(conv: nn.Conv2d) -> None:
    """Give ``conv.weight`` the strides of the gradients it gets from channels-last activations.

    The spatial convs run on a permuted (channels-last) view, so their weight gradients come out
    channels-last; they differ from a default weight only in the strides of size-1 dimensions
    (same memory), which DDP reports as "Grad strides do not match bucket view strides" and then
    copies element by element. Values, names and shapes are unchanged (checkpoints load as before).
    """
    conv.weight.data = torch.empty_like(conv.weight, memory_format=torch.channels_last).copy_(conv.weight)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- variants
VARIANTS: dict[str, dict] = {
    "videofocalnet_nano": dict(depths=[1, 1, 2, 1], embed_dim=96),
    "videofocalnet_tiny": dict(depths=[2, 2, 6, 2], embed_dim=96),
    "videofocalnet_small": dict(depths=[2, 2, 18, 2], embed_dim=96),
    "videofocalnet_base": dict(depths=[2, 2, 18, 2], embed_dim=128),
}

# Arguments timm.create_model passes to every entry point that are not the network's own
# (device and dtype are applied to the built model, as timm's own models do).
_TIMM_ONLY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "device", "dtype",
                     "pretrained_model_args")
# the weights file of a local model folder (``timm.create_model("local-dir:FOLDER", pretrained=True)``)
FOLDER_WEIGHTS = "model.safetensors"


def _create(variant: str, pretrained: bool = False, **kwargs) -> VideoFocalNet:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = kwargs.get("pretrained_cfg")
    cfg = cfg if isinstance(cfg, dict) else (cfg.to_dict() if hasattr(cfg, "to_dict") else {})
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for key in _TIMM_ONLY_KWARGS:
        kwargs.pop(key, None)
    path = None
    if pretrained:
        # No weights are downloaded: a local official checkpoint or model folder is named explicitly.
        path = overlay.get("file") or (cfg.get("file") if cfg.get("source") == "local-dir" else None)
        if path and os.path.isdir(path):
            path = os.path.join(path, FOLDER_WEIGHTS)
        if not path:
            raise ValueError(
                f"{variant}: pretrained=True needs a local checkpoint, e.g. "
                "pretrained_cfg_overlay=dict(file='video-focalnet_base_k400.pth')"
            )
    config = {**VARIANTS[variant], **kwargs}
    new_head = False
    if path:
        from dvfl.models.checkpoint import read_state_dict

        weights = read_state_dict(path)  # (once: a Video-FocalNet-B checkpoint is 630 MB)
        head = weights.get("head.weight")
        if "num_classes" not in kwargs:  # the checkpoint's classes (K400: 400), not 1000; none: a feature extractor's
            config["num_classes"] = int(head.shape[0]) if head is not None else 0
        # timm's rule: another num_classes asked for gets a new classifier (said in a warning)
        new_head = head is not None and int(head.shape[0]) != config.get("num_classes", 1000)
    with torch.device(device) if device is not None and not path else contextlib.nullcontext():
        model = VideoFocalNet(**config)
    if path:
        from dvfl.models.checkpoint import load_checkpoint

        load_checkpoint(model, path, reinit_head=new_head, state_dict=weights)
        if new_head and config["num_classes"]:
            warnings.warn(f"{path}: its {int(head.shape[0])}-class head is not loaded; a new "
                          f"{config['num_classes']}-class head is initialised (num_classes)", stacklevel=3)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    if cfg:  # a folder's config.json (crop, interpolation, label names): timm's data config reads it back
        model.pretrained_cfg = model.default_cfg = cfg
    return model


@register_model
def videofocalnet_nano(pretrained: bool = False, **kwargs) -> VideoFocalNet:
    """VFL-Net / DVFL-Net student: depths [1,1,2,1], width 96 (22.2M params at 101 classes)."""
    return _create("videofocalnet_nano", pretrained, **kwargs)


@register_model
def videofocalnet_tiny(pretrained: bool = False, **kwargs) -> VideoFocalNet:
    """Video-FocalNet-T: depths [2,2,6,2], width 96."""
    return _create("videofocalnet_tiny", pretrained, **kwargs)


@register_model
def videofocalnet_small(pretrained: bool = False, **kwargs) -> VideoFocalNet:
    """Video-FocalNet-S: depths [2,2,18,2], width 96."""
    return _create("videofocalnet_small", pretrained, **kwargs)


@register_model
def videofocalnet_base(pretrained: bool = False, **kwargs) -> VideoFocalNet:
    """Video-FocalNet-B, the paper's teacher: depths [2,2,18,2], width 128 (157.1M params)."""
    return _create("videofocalnet_base", pretrained, **kwargs)
