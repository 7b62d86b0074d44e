"""Video-FocalNet models (registered with timm on import) and checkpoint loading."""
from dvfl.models.video_focalnet import (  # noqa: F401
    VARIANTS,
    SpatioTemporalFocalModulation,
    VideoFocalNet,
    videofocalnet_base,
    videofocalnet_nano,
    videofocalnet_small,
    videofocalnet_tiny,
)
from dvfl.models.checkpoint import (  # noqa: F401
    CheckpointError,
    LoadReport,
    checkpoint_filter_fn,
    init_from_image_focalnet,
    load_checkpoint,
    read_state_dict,
)
