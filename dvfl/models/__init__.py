"""Video-FocalNet models (registered with timm on import) and checkpoint loading."""
from dvfl.models.video_focalnet import (  # noqa: F401
    VARIANTS,
    SpatioTemporalFocalModulation,
    VideoFocalNet,
    videofocalnet_base,
    videofocalnet_nano,
    videofocalnet_small,
    videofocalnet_tiny,
    set_temporal_impl,
)
from dvfl.models.checkpoint import (  # noqa: F401
    CheckpointError,
    LoadReport,
    check_checkpoint,
    checkpoint_filter_fn,
    image_focalnet_matches,
    init_from_image_focalnet,
    load_checkpoint,
    read_state_dict,
)


def build_model(name: str, *, device=None, **kwargs):
    """The one model factory: ``timm.create_model(name, **kwargs)`` with timm's argument names
    (``num_classes``, ``num_frames``, ``img_size``, ``embed_dim``, ...).

    ``device="meta"`` builds without allocating (FLOP counting); another device moves the model
    there. An unknown name is a ``ValueError`` that lists the registered Video-FocalNets.
    """
    import timm
    import torch

    try:
        if device is not None and torch.device(device).type == "meta":
            with torch.device("meta"):
                return timm.create_model(name, **kwargs)
        model = timm.create_model(name, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(f"unknown model {name!r}; choose one of {timm.list_models('videofocalnet_*')}") from exc
        raise
    return model.to(device) if device is not None else model
