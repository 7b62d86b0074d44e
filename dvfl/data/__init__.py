"""Data: dataset adapters, the embedded synthetic dataset, sampling, and the Ray Data ingest
that turns videos into Parquet clip shards (see docs/data-format.md)."""
from .manifest import Manifest, Problem, VideoEntry
from .sampling import clip_id, plan_views, resized_hw, sample_clip_indices, stable_seed
from .shards import (CLIP_SCHEMA, decode_frames, load_dataset_info, read_clip_dataset, read_clips_table,
                     shard_paths)

__all__ = ["Manifest", "Problem", "VideoEntry", "clip_id", "plan_views", "resized_hw", "sample_clip_indices",
           "stable_seed", "CLIP_SCHEMA", "decode_frames", "load_dataset_info", "read_clip_dataset",
           "read_clips_table", "shard_paths"]
