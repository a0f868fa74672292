"""Default data settings as an ml_collections ConfigDict; the training config embeds `get_data_config()`.

`sources` is a tuple of dicts, each with a `kind` and a `weight` (a tuple, so that the command line can set it:
`--config.data.sources='({"kind": "folder", "path": "/data/hq", "weight": 1.0},)'`, trailing comma included):
  {"kind": "folder", "path": ...}
  {"kind": "tar", "shards": [paths] or "glob/*.tar", "index_dir": None}
  {"kind": "tfds", "name": ..., "split": "train", "data_dir": None} or {"kind": "tfds", "builder_dir": ...}
  {"kind": "procedural", "n": 256, "size": 512, "seed": 0}
`degradation` is the full degradation parameter tree (PASD preset by default); to train with another preset,
set it to `data_pipeline.presets.get_preset(name).to_dict()`, or override single fields from the command line.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from data_pipeline.presets import PASD


def get_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.sources = ({"kind": "procedural", "n": 256, "size": 512, "seed": 0, "weight": 1.0},)
    c.crop_size = 512
    c.random_flip = True
    c.degradation = PASD.to_dict()
    c.pairs = "realesrgan"   # "grayscale": colorization pairs, gray crop -> colour crop (data_pipeline.color_pairs)
    # bad data: images with a short side below min_side are skipped; a record that fails is replaced by the
    # next one in source order, at most max_retries times in a row; probe_records are decoded at start-up.
    c.min_side = 32
    c.max_retries = 32
    c.probe_records = 16
    # Grain: per-process read thread and buffers (elements are whole batches: keep buffers small).
    c.read_threads = 1
    c.prefetch_buffer_size = 2
    c.worker_buffer_size = 2
    return c


def as_plain_dict(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None) -> dict[str, Any]:
    """Defaults overlaid with `cfg` (a ConfigDict, a dict, or None), as plain Python containers."""
    out = get_data_config().to_dict()
    if cfg is None:
        return out
    given = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    unknown = set(given) - set(out)
    if unknown:
        raise KeyError(f"unknown data config keys: {sorted(unknown)}")
    out.update(given)
    return out
