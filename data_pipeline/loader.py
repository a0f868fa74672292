"""The Grain training loader: LQ/HQ pairs synthesised on the host, deterministic, per-host, resumable.

Pipeline (per source: record refs -> seed -> shuffle -> repeat; several sources are then mixed by weight):
    refs -> .seed -> .shuffle -> .repeat -> [mix] -> .random_map(MakePair) -> [host slice] -> .batch
    -> .to_iter_dataset -> .mp_prefetch
- `random_map` sits after `repeat`, so every epoch gets fresh crops and degradations, and each element is a
  pure function of (seed, global index): identical for any worker count.
- The per-host slice comes *after* the random map: indices stay global, so hosts never share random streams
  (slicing the source first would give every host the same kernels, JPEG qualities and noise fields).
- MakePair reads the record itself (the pipeline carries (source, index) references) so that a record that
  fails to decode is replaced by the next one in source order, and the skip is counted in the batch.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pasd_jax import image_io
from data_pipeline import bad_data
from data_pipeline.config import as_plain_dict
from data_pipeline.color_pairs import PAIR_KINDS, gray_condition
from data_pipeline.degradation import degrade_uint8
from data_pipeline.gt_prep import prepare_gt
from pasd_jax.tokenizer import load_tokenizer, tokenize
from pasd_jax.image_io import CONVERT_KINDS, SKIP_REASONS, SkipRecord
from data_pipeline.presets import DegradationConfig
from data_pipeline.sources import DataError, FolderSource, Mixture, ProceduralSource, TarShardSource, TfdsSource

STATE_VERSION = 1


def grain_absl_workaround() -> None:
    """grain 0.2.18 reads an absl flag in `mp_prefetch`; outside `absl.app.run` the flags are unparsed and it
    raises UnparsedFlagAccessError. Marking them parsed (defaults kept, argv untouched) avoids that."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _worker_init(worker_index: int, worker_count: int) -> None:
    import cv2

    from data_pipeline.workers import exit_with_parent

    exit_with_parent()  # a SIGKILLed trainer must not leave its workers behind
    cv2.setNumThreads(1)  # one core per worker; cv2's own pool would oversubscribe
    grain_absl_workaround()


# ----------------------------------------------------------------------------------------------- sources


def source_from_spec(spec: Mapping[str, Any]):
    """One source from a config dict (see data_pipeline.config)."""
    spec = dict(spec)
    kind = spec.pop("kind")
    spec.pop("weight", None)
    if kind == "folder":
        return FolderSource(spec["path"])
    if kind == "tar":
        return TarShardSource(spec["shards"], index_dir=spec.get("index_dir"))
    if kind == "tfds":
        return TfdsSource(spec.get("name"), split=spec.get("split", "train"), data_dir=spec.get("data_dir"),
                          builder_dir=spec.get("builder_dir"), image_key=spec.get("image_key", "image"),
                          caption_key=spec.get("caption_key", "caption"))
    if kind == "procedural":
        return ProceduralSource(spec.get("n", 256), spec.get("size", 512), spec.get("seed", 0))
    raise DataError(f"unknown source kind {kind!r} (folder, tar, tfds, procedural)")


SOURCES_EXAMPLE = """--config.data.sources='({"kind": "folder", "path": "/data/hq", "weight": 1.0},)'"""


def sources_from_config(specs: Sequence[Mapping[str, Any]]) -> Mixture:
    if not specs:
        raise DataError(f"data config has no sources; give at least one, e.g. {SOURCES_EXAMPLE}")
    bad = [s for s in specs if not isinstance(s, Mapping) or "kind" not in s]
    if bad:
        raise DataError(f"data.sources must be a tuple of dicts with a 'kind' (folder, tar, tfds, procedural), "
                         f"got {bad[:3]}; on the command line write it as a Python tuple, with the trailing comma "
                         f"for a single source: {SOURCES_EXAMPLE}")
    return Mixture(tuple(source_from_spec(s) for s in specs), tuple(float(s.get("weight", 1.0)) for s in specs))


@dataclasses.dataclass(frozen=True)
class _Refs:
    """The grain source of one component: element i is the reference (component, i), read later."""

    component: int
    n: int

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[int, int]:
        return (self.component, int(i))


# ------------------------------------------------------------------------------------------ element work


def _zero_counts() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(len(SKIP_REASONS), np.int32), np.zeros(len(CONVERT_KINDS), np.int32)


def load_image(record: Mapping[str, Any], min_side: int) -> tuple[np.ndarray, str | None]:
    img = record["image"]
    if isinstance(img, np.ndarray):
        return image_io.check_array(img, min_side)
    return image_io.decode_rgb(img, min_side)


def read_good_record(source, index: int, min_side: int, max_retries: int, bad: list | None = None):
    """(rgb, caption, skip counts, convert counts) from record `index`, or from the next good one after it;
    the records skipped on the way are appended to `bad` (reason, record name, detail) when it is given."""
    skips, converts = _zero_counts()
    n = len(source)
    errors = []
    for attempt in range(max_retries + 1):
        j = (index + attempt) % n
        try:
            try:
                rec = source[j]
            except (OSError, ValueError) as e:
                raise SkipRecord("read_error", f"{type(e).__name__}: {e}") from None
            rgb, kind = load_image(rec, min_side)
        except SkipRecord as e:
            skips[SKIP_REASONS.index(e.reason)] += 1
            errors.append(f"#{j}: {e}")
            if bad is not None:
                bad.append(bad_data.entry(source, j, e))
            continue
        if kind is not None:
            converts[CONVERT_KINDS.index(kind)] += 1
        return rgb, rec.get("caption", ""), skips, converts
    raise RuntimeError(f"{max_retries + 1} consecutive records of {source!r} failed from index {index}: "
                       + "; ".join(errors[:5]))


class MakePair:
    """Grain RandomMap: (component, index) -> {hq, lq, input_ids, skip_counts, convert_counts}.

    hq/lq are uint8 512x512x3 (both exactly 8-bit, so nothing is lost); all randomness comes from Grain's
    per-element generator. The tokenizer is loaded lazily once per process. With `report_bad`, each element also
    names the records skipped while making it (`bad_records`, see data_pipeline.bad_data).
    """

    def __init__(self, sources: Sequence[Any], degradation: DegradationConfig, tokenizer_path: str | None,
                 crop_size: int, random_flip: bool, min_side: int, max_retries: int, pairs: str = "realesrgan",
                 report_bad: bool = False):
        if pairs not in PAIR_KINDS:  # "grayscale": colorization pairs (data_pipeline.color_pairs)
            raise DataError(f"data.pairs={pairs!r}: expected one of {PAIR_KINDS}")
        self.pairs = pairs
        self.report_bad = report_bad
        self.sources = tuple(sources)
        self.degradation = degradation
        self.tokenizer_path = tokenizer_path
        self.crop_size, self.random_flip = crop_size, random_flip
        self.min_side, self.max_retries = min_side, max_retries

    def random_map(self, element: tuple[int, int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        comp, index = element
        bad = [] if self.report_bad else None
        rgb, caption, skips, converts = read_good_record(self.sources[comp], index, self.min_side, self.max_retries,
                                                         bad)
        hq = prepare_gt(rgb, self.crop_size, rng, flip=self.random_flip)
        lq = gray_condition(hq) if self.pairs == "grayscale" else degrade_uint8(hq, rng, self.degradation)
        out = {"hq": hq, "lq": lq, "skip_counts": skips, "convert_counts": converts}
        if bad is not None:
            out["bad_records"] = bad_data.encode(bad)
        if self.tokenizer_path is not None:
            out["input_ids"] = tokenize(load_tokenizer(self.tokenizer_path), caption)
        return out

    __call__ = random_map  # grain accepts a plain callable(element, rng) as well


def probe(source, n_probe: int, min_side: int, *, seed: int = 0) -> None:
    """Start-up check of a seeded random sample of records (see data_pipeline.bad_data.probe)."""
    bad_data.probe(source, n_probe, min_side, load_image, seed=seed)


# ------------------------------------------------------------------------------------------------ pipeline


def _derive_seed(seed: int, *path: int) -> int:
    """A 31-bit seed from (seed, path), stable across code edits (unlike position-derived seeds)."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0] & 0x7FFFFFFF)


def reference_stream(mixture: Mixture, seed: int):
    """Infinite grain.MapDataset of (component, record index): each source shuffled per epoch, then mixed."""
    import grain

    parts = []
    for k, s in enumerate(mixture.sources):
        ds = grain.MapDataset.source(_Refs(k, len(s))).seed(_derive_seed(seed, 0, k))
        parts.append(ds.shuffle(seed=_derive_seed(seed, 1, k)).repeat())
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, list(mixture.weights))


def build_dataset(cfg: Mapping[str, Any] | None, *, seed: int, process_index: int, process_count: int,
                  batch_size: int, tokenizer_path: str | None, source=None, bad_records: bool = False):
    """The batched grain.MapDataset (before to_iter_dataset / mp_prefetch); exposed for tests and tools."""
    c = as_plain_dict(cfg)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    mixture = source if isinstance(source, Mixture) else (
        Mixture((source,), (1.0,)) if source is not None else sources_from_config(c["sources"]))
    for k, s in enumerate(mixture.sources):
        probe(s, c["probe_records"], c["min_side"], seed=_derive_seed(seed, 3, k))
    ds = reference_stream(mixture, seed)
    pair = MakePair(mixture.sources, DegradationConfig.from_dict(c["degradation"]), tokenizer_path,
                    c["crop_size"], c["random_flip"], c["min_side"], c["max_retries"], pairs=c["pairs"],
                    report_bad=bad_records)
    ds = ds.random_map(pair, seed=_derive_seed(seed, 2))
    ds = ds[process_index::process_count]  # after the random map: global indices, distinct streams per host
    return ds.batch(batch_size, drop_remainder=True)


class TrainIterator:
    """Iterator of batches with JSON-serialisable `get_state`/`set_state`; close it (or use `with`)."""

    def __init__(self, it, settings: dict[str, Any]):
        self._it = it
        self.settings = settings

    def __iter__(self) -> "TrainIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            raise StopIteration
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "settings": self.settings, "grain": self._it.get_state()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        saved = dict(state["settings"])
        if saved != self.settings:
            diff = {k: (saved.get(k), self.settings.get(k)) for k in set(saved) | set(self.settings)
                    if saved.get(k) != self.settings.get(k)}
            raise ValueError(f"loader state was saved with other settings (saved, now): {diff}; the Grain state "
                             "only resumes with the same seed, host layout, batch size and num_workers")
        self._it.set_state(state["grain"])

    def close(self) -> None:
        """Stops Grain's workers and threads; dropping the iterator here lets its finaliser run while the
        interpreter is still whole (at exit it prints harmless tracebacks)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()
        del it
        import gc

        gc.collect()

    def __enter__(self) -> "TrainIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_train_iterator(cfg: Mapping[str, Any] | None, *, seed: int, process_index: int, process_count: int,
                        batch_size: int, tokenizer_path: str | None, num_workers: int = 0,
                        source=None, bad_records: bool = False) -> TrainIterator:
    """The training batch iterator (see data_pipeline/README.md for the batch contract).

    `source` (a source object or a Mixture) overrides `cfg.sources`. `num_workers=0` runs in-process;
    N > 0 uses N Grain worker processes (results are identical; the saved state is tied to N). `bad_records`
    adds each element's skipped records by name (the trainer logs them).
    """
    import grain

    c = as_plain_dict(cfg)
    ds = build_dataset(c, seed=seed, process_index=process_index, process_count=process_count,
                       batch_size=batch_size, tokenizer_path=tokenizer_path, source=source,
                       bad_records=bad_records)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=c["read_threads"],
                                                 prefetch_buffer_size=c["prefetch_buffer_size"]))
    if num_workers > 0:
        grain_absl_workaround()
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")  # inherited by the spawned workers: one core each
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                               per_worker_buffer_size=c["worker_buffer_size"]),
                                  worker_init_fn=_worker_init)
    settings = {"seed": int(seed), "process_index": int(process_index), "process_count": int(process_count),
                "batch_size": int(batch_size), "num_workers": int(num_workers)}
    return TrainIterator(iter(it_ds), settings)


def count_summary(batch: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Per-batch totals of skipped and converted records, named `skipped/<reason>` and `converted/<kind>`."""
    skips = np.asarray(batch["skip_counts"]).reshape(-1, len(SKIP_REASONS)).sum(0)
    conv = np.asarray(batch["convert_counts"]).reshape(-1, len(CONVERT_KINDS)).sum(0)
    out = {f"skipped/{r}": int(v) for r, v in zip(SKIP_REASONS, skips, strict=True)}
    out.update({f"converted/{k}": int(v) for k, v in zip(CONVERT_KINDS, conv, strict=True)})
    return out

