"""Training batches: the data pipeline's Grain iterator (or a synthetic one) -> global [accum, batch, ...] arrays.

Each host reads its own shard: the iterator is built with this process's index and yields `batch_size /
process_count` samples per optimizer step (uint8 `hq`/`lq` NHWC, int32 `input_ids`, plus scalar skip counters),
which become this host's rows of the global batch. Null captions are drawn in the train step, not here.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from pasd_jax import sharding as shd

MODEL_KEYS = ("hq", "lq", "input_ids")
BOS, EOS = 49406, 49407


class SyntheticIterator:
    """Random smooth HQ images, blocky noisy LQ copies and random captions; sample i is a pure function of
    (seed, i). Process p of n yields exactly the rows of the global batch its devices hold, so a multi-host run
    sees the batches of a single-process run. For benchmarks and tests; state is the step counter."""

    def __init__(self, *, seed: int, resolution: int, batch_size: int, grad_accum: int, process_index: int = 0,
                 process_count: int = 1, vocab_size: int = 49408, max_length: int = 77):
        self.seed, self.res, self.accum = seed, resolution, grad_accum
        self.micro = batch_size // grad_accum
        self.local = self.micro // process_count
        self.offset = process_index * self.local
        self.batch_size, self.vocab, self.max_length = batch_size, vocab_size, max_length
        self.step = 0

    def sample(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        r = self.res
        coarse = rng.uniform(0, 255, (4, 4, 3))
        hq = np.kron(coarse, np.ones((r // 4, r // 4, 1)))
        yy, xx = np.meshgrid(np.arange(r), np.arange(r), indexing="ij")
        freq = rng.uniform(0.05, 0.5, 2)
        hq = np.clip(hq + 40 * np.sin(freq[0] * yy + freq[1] * xx)[..., None], 0, 255).astype(np.uint8)
        lq = hq.reshape(r // 4, 4, r // 4, 4, 3).mean(axis=(1, 3))
        lq = np.repeat(np.repeat(lq, 4, 0), 4, 1) + rng.normal(0, 8, (r, r, 3))
        ids = np.full(self.max_length, EOS, np.int32)
        n = int(rng.integers(1, 20))
        ids[0], ids[1:n + 1] = BOS, rng.integers(0, min(BOS, self.vocab), n)
        return {"hq": hq, "lq": np.clip(lq, 0, 255).astype(np.uint8), "input_ids": ids}

    def __iter__(self) -> SyntheticIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        first = self.step * self.batch_size
        idx = [first + a * self.micro + self.offset + j for a in range(self.accum) for j in range(self.local)]
        samples = [self.sample(i) for i in idx]
        self.step += 1
        return {k: np.stack([s[k] for s in samples]) for k in MODEL_KEYS}

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])

    def close(self) -> None:
        pass


def make_iterator(config, *, process_index: int, process_count: int, vocab_size: int) -> Iterator:
    """This host's training iterator: `loader.source` "pipeline" (data_pipeline's Grain loader on the `data`
    section) or "synthetic"."""
    lc = config.loader
    if lc.source == "synthetic":
        return SyntheticIterator(seed=config.seed, resolution=config.data.crop_size,
                                 batch_size=config.batch_size, grad_accum=config.grad_accum,
                                 process_index=process_index, process_count=process_count, vocab_size=vocab_size)
    from data_pipeline.loader import make_train_iterator
    return make_train_iterator(config.data, seed=config.seed, process_index=process_index,
                               process_count=process_count, batch_size=config.batch_size // process_count,
                               tokenizer_path=lc.tokenizer, num_workers=lc.num_workers, bad_records=True)


def split_counters(batch: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(model inputs, named skipped/converted record counts of this batch) of one loader batch.

    The inputs are copied out of the loader's buffers: Grain hands batches over in shared memory, and one still
    referenced when the process exits (by a NaN stop's traceback, or by a CPU jax.Array aliasing it) is never
    unlinked ("leaked shared_memory objects"). A copy is cheap next to a step and frees the block at once."""
    arrays = {k: np.array(batch[k]) for k in MODEL_KEYS}
    counters = {}
    if "skip_counts" in batch:
        from data_pipeline.loader import count_summary
        counters = count_summary(batch)
    return arrays, counters


def bad_records(batch: Mapping[str, Any]) -> list[dict[str, str]]:
    """The records the loader skipped while making this batch, by name ({reason, record, detail})."""
    if "bad_records" not in batch:
        return []
    from data_pipeline.bad_data import decode
    return decode(batch)


def to_global(arrays: Mapping[str, np.ndarray], grad_accum: int, resolution: int,
              batch_sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
    """This host's [accum * rows, ...] arrays -> global [accum, batch, ...] arrays sharded over data x fsdp."""
    hq = arrays["hq"]
    if hq.ndim != 4 or hq.shape[1:] != (resolution, resolution, 3) or hq.shape[0] % grad_accum:
        raise ValueError(f"the loader gave hq of shape {hq.shape}; expected [{grad_accum} x rows, {resolution}, "
                         f"{resolution}, 3] uint8 (data.crop_size={resolution}, grad_accum={grad_accum})")
    local = {k: v.reshape(grad_accum, -1, *v.shape[1:]) for k, v in arrays.items()}
    return shd.global_batch(local, batch_sharding)
