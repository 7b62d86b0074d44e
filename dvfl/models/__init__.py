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
