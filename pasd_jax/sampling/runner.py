"""Super-resolve a file or a folder: per-image seeds, batching by processed size, colour fix, safe writes.

Seeds: each image's PRNG key is derived from `--seed` and its relative path, so a result does not depend on which
other files are in the folder or their order. (The official `test_pasd.py` reuses one generator across a folder, so
there an image's result depends on the files sorted before it.)

One bad image never stops a run: it is reported, the rest are written, and the summary lists every failure.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sys
import traceback
from typing import Callable, Protocol, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from pasd_jax import image_ops
from pasd_jax.image_io import ImageReadError, find_images, output_name, read_image, write_image

from pasd_jax.sampling import tasks
from pasd_jax.sampling.tasks import COLOR_FIXES


class Sampler(Protocol):
    def sample(self, images_u8: np.ndarray, prompts: Sequence[str], negative_prompts: Sequence[str],
               keys: jax.Array, options, *, pad_to: int | None = None) -> np.ndarray: ...


PromptFn = Callable[[Image.Image, str], str]


@dataclasses.dataclass(frozen=True)
class RunSettings:
    upscale: int = 1
    process_size: int = 768
    color_fix: str = "wavelet"
    keep_alpha: bool = False
    overwrite: bool = False
    seed: int = 0
    batch_size: int = 1
    negative_prompt: str = ""
    task: str = tasks.SR

    def __post_init__(self):
        object.__setattr__(self, "task", tasks.resolve(self.task))
        if self.upscale < 1:
            raise ValueError(f"--upscale must be a positive integer, got {self.upscale}")
        if self.process_size < 8:
            raise ValueError(f"--process-size must be at least 8, got {self.process_size}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"--color-fix must be one of {COLOR_FIXES}, got {self.color_fix!r}")


@dataclasses.dataclass
class Summary:
    written: list[str] = dataclasses.field(default_factory=list)
    existing: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def report(self) -> str:
        lines = [f"{len(self.written)} written, {len(self.existing)} skipped (output exists; --overwrite to redo), "
                 f"{len(self.failed)} failed"]
        lines += [f"  FAILED {rel}: {msg}" for rel, msg in self.failed]
        return "\n".join(lines)


def image_key(seed: int, relative: str) -> jax.Array:
    """A PRNG key from (seed, relative path): stable across runs, folders and file orders."""
    digest = hashlib.sha256(f"{int(seed)}\0{relative}".encode()).digest()
    return jax.random.PRNGKey(int.from_bytes(digest[:8], "little") >> 1)


@dataclasses.dataclass
class _Item:
    path: pathlib.Path
    rel: str
    out: pathlib.Path
    size: tuple[int, int] | None = None  # original (w, h)


def _plan(inputs: pathlib.Path, output: pathlib.Path, settings: RunSettings, summary: Summary) -> list[_Item]:
    items, claimed = [], {}
    for path, rel in find_images(inputs):
        out = output / output_name(rel)
        if out in claimed:
            summary.failed.append((rel, f"its output {out} is also the output of {claimed[out]}; rename one"))
            continue
        claimed[out] = rel
        if out.exists() and not settings.overwrite:
            summary.existing.append(rel)
            continue
        try:
            with Image.open(path) as img:
                size = img.size
        except Exception as e:  # noqa: BLE001 - any header failure is reported per file
            summary.failed.append((rel, str(ImageReadError(f"not an image file or unreadable ({e})"))))
            continue
        items.append(_Item(path, rel, out, size))
    return items


def _resize_alpha(alpha: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(alpha, "L").resize(size, Image.BICUBIC))


def run(sampler: Sampler, options, inputs: str | pathlib.Path, output: str | pathlib.Path,
        settings: RunSettings, prompt_fn: PromptFn, *, progress: bool = True) -> Summary:
    """Super-resolve every image under `inputs` into `output` (same relative names, .png)."""
    inputs, output = pathlib.Path(inputs), pathlib.Path(output)
    summary = Summary()
    items = _plan(inputs, output, settings, summary)
    groups: dict[tuple[int, int], list[_Item]] = {}
    for item in items:
        try:
            w, h = image_ops.processed_size(*item.size, settings.upscale, settings.process_size,
                                            tasks.control_type(settings.task))
        except ValueError as e:
            summary.failed.append((item.rel, f"{item.path}: {e}"))
            continue
        groups.setdefault((w, h), []).append(item)

    bar = tqdm(total=sum(len(g) for g in groups.values()), disable=not progress, unit="img", file=sys.stderr)
    for group in groups.values():
        for start in range(0, len(group), settings.batch_size):
            _run_batch(sampler, options, group[start:start + settings.batch_size], settings, prompt_fn, summary)
            bar.update(len(group[start:start + settings.batch_size]))
    bar.close()
    return summary


def _run_batch(sampler, options, batch: list[_Item], settings: RunSettings, prompt_fn: PromptFn,
               summary: Summary) -> None:
    ready = []
    for item in batch:
        try:
            loaded = read_image(item.path)
            prepared = tasks.prepare(settings.task, loaded.rgb, settings.upscale, settings.process_size)
            prompt = prompt_fn(Image.fromarray(loaded.rgb, "RGB"), item.rel)
            ready.append((item, loaded, prepared, prompt))
        except (ImageReadError, ValueError, OSError) as e:
            summary.failed.append((item.rel, str(e)))
    if not ready:
        return
    try:
        images = np.stack([prepared.lq for _, _, prepared, _ in ready])
        keys = jax.numpy.stack([image_key(settings.seed, item.rel) for item, _, _, _ in ready])
        # A short batch is padded to the batch size: reusing the compiled program beats compiling a new one.
        outs = sampler.sample(images, [p for *_, p in ready], [settings.negative_prompt] * len(ready), keys,
                              options, pad_to=settings.batch_size)
    except Exception as e:  # noqa: BLE001 - a failing batch must not end the run
        msg = f"sampling failed: {type(e).__name__}: {e}"
        if not isinstance(e, (ValueError, MemoryError)):
            traceback.print_exc(file=sys.stderr)
        summary.failed.extend((item.rel, msg) for item, *_ in ready)
        return
    for (item, loaded, prepared, _), out in zip(ready, outs):
        try:
            final = tasks.finish(settings.task, np.asarray(out), prepared, settings.color_fix)
            alpha = None
            if settings.keep_alpha and loaded.alpha is not None:
                alpha = _resize_alpha(loaded.alpha, (final.shape[1], final.shape[0]))
            write_image(item.out, final, alpha)
            summary.written.append(item.rel)
        except (OSError, ValueError) as e:
            summary.failed.append((item.rel, f"cannot write {item.out}: {e}"))
