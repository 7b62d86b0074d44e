"""DVFL-Net on Ray: Video-FocalNet distillation as a distributed pipeline.

Importing :mod:`dvfl` registers the Video-FocalNet variants with timm, so that
``timm.create_model("videofocalnet_nano", num_classes=101, num_frames=8)`` works.
"""
from dvfl import models  # noqa: F401  (registers the timm variants)

__version__ = "0.1.0"
