"""Super-resolve a file or a folder: per-image seeds, batching by processed size, colour fix, safe writes.

Seeds: each image's PRNG key is derived from `--seed` and its relative path, so a result does not depend on which
other files are in the folder, their order, or which process of a multi-host run samples it. (The official
`test_pasd.py` reuses one generator across a folder, so there an image's result depends on the files sorted
before it.)

Host work overlaps the device: with `io_threads > 0` the next batches are decoded and preprocessed, and finished
images colour-fixed, resized and PNG-encoded, in a thread pool while the device samples. Results are identical
either way.

One bad image never stops a run: it is reported, the rest are written, and the summary lists every failure.
Outputs are checked again just before sampling and when written, so two runs into one folder share the work
instead of redoing or replacing each other's images.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import pathlib
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from pasd_jax.image_io import ImageReadError, read_image
from pasd_jax.sampling import memory, tasks, tiling
from pasd_jax.sampling.options import SamplingOptions
from pasd_jax.sampling.plan import Item, Plan, check_output, make_plan
from pasd_jax.sampling.summary import Summary
from pasd_jax.sampling.tasks import COLOR_FIXES
from pasd_jax.sampling.writing import write_result

__all__ = ["COLOR_FIXES", "RunSettings", "Summary", "execute", "image_key", "run"]
PREFETCH = 2  # batches decoded ahead of the device


class Sampler(Protocol):
    def sample(self, images_u8: np.ndarray, prompts: Sequence[str], negative_prompts: Sequence[str],
               keys: jax.Array, options, *, pad_to: int | None = None, on_step=None) -> np.ndarray: ...


PromptFn = Callable[[Image.Image, str], str]


@dataclasses.dataclass(frozen=True)
class RunSettings:
    upscale: int = 1
    process_size: int = 768
    color_fix: str = "wavelet"
    keep_alpha: bool = False
    overwrite: bool = False
    seed: int = 0
    batch_size: int = 1  # 0: one image per device of the sampler (1 for sizes sampled with latent tiling)
    negative_prompt: str = ""
    task: str = tasks.SR
    io_threads: int = 4  # host threads beside the device; 0: everything in order on the calling thread

    def __post_init__(self):
        object.__setattr__(self, "task", tasks.resolve(self.task))
        if self.upscale < 1:
            raise ValueError(f"--upscale must be a positive integer, got {self.upscale}")
        if self.process_size < 8:
            raise ValueError(f"--process-size must be at least 8, got {self.process_size}")
        if self.batch_size < 0:
            raise ValueError(f"--batch-size must be at least 1 (or 0: one image per device), got {self.batch_size}")
        if self.color_fix not in COLOR_FIXES:
            raise ValueError(f"--color-fix must be one of {COLOR_FIXES}, got {self.color_fix!r}")
        if self.io_threads < 0:
            raise ValueError(f"--io-threads must be 0 or more, got {self.io_threads}")


def batch_size(settings: RunSettings, sampler, options, size: tuple[int, int]) -> int:
    """Images per sampler call for processed size (w, h): the setting, or with 0 one per device of the sampler's
    mesh (the untiled program pads to a multiple of the device count anyway, so this costs no extra compile) and 1
    for sizes in the latent-tiling path, whose devices already share the tiles."""
    if settings.batch_size:
        return settings.batch_size
    mesh = getattr(sampler, "mesh", None)
    tile, f = getattr(options, "latent_tile_size", None), getattr(sampler, "latent_factor", 8)
    if mesh is None or (tile and tiling.needs_tiling(size[1] // f, size[0] // f, tile)):
        return 1
    return int(mesh.size)


def memory_options(sampler, options, size: tuple[int, int], batch: int) -> tuple[Any, str | None]:
    """The options a processed size (w, h) is sampled with, from the memory plan (`sampling.memory`): the
    requested ones when they fit the budget, else ones that do (latent tiles, tiled VAE), else (options, the
    message naming the size, the estimate and the flags that help). Stand-in samplers without models pass through."""
    models = getattr(sampler, "models", None)
    if models is None or not isinstance(options, SamplingOptions):
        return options, None
    mesh = getattr(sampler, "mesh", None)
    mp = memory.plan(models, options, size[1], size[0], batch=batch, devices=int(mesh.size) if mesh else 1,
                     params=getattr(sampler, "params", None))
    if not mp.fits:
        return options, mp.message
    if mp.changes:
        print(f"memory plan: {mp.message}", file=sys.stderr)
    return mp.options, None


def compile_note(sampler, options, size: tuple[int, int], seen: set) -> str | None:
    """The line printed before the first batch of a processed size: its program compiles first (minutes at SD1.5
    size on a CPU), so the wait is announced with its expected length instead of a silent progress bar."""
    models = getattr(sampler, "models", None)
    key = (tuple(size), options)
    if models is None or not isinstance(options, SamplingOptions) or key in seen:
        return None
    seen.add(key)
    f = 2 ** (len(models.vae.config.block_out_channels) - 1)
    tiled = tiling.needs_tiling(size[1] // f, size[0] // f, options.latent_tile_size)
    secs = memory.expected_compile_seconds(models, tiled)
    return (f"{size[0]}x{size[1]}: compiling the {'tiled ' if tiled else ''}sampler before its first batch "
            f"(about {secs:.0f} s on a 2-core CPU the first time; the compilation cache makes later runs quick)")


def image_key(seed: int, relative: str) -> jax.Array:
    """A PRNG key from (seed, relative path): stable across runs, folders and file orders."""
    digest = hashlib.sha256(f"{int(seed)}\0{relative}".encode()).digest()
    return jax.random.PRNGKey(int.from_bytes(digest[:8], "little") >> 1)


def run(sampler: Sampler, options, inputs: str | pathlib.Path, output: str | pathlib.Path,
        settings: RunSettings, prompt_fn: PromptFn, *, progress: bool = True) -> Summary:
    """Super-resolve every image under `inputs` into `output` (same relative names, .png)."""
    check_output(output, inputs)
    plan = make_plan(inputs, output, settings)
    return execute(sampler, options, plan, settings, prompt_fn, progress=progress)


# --- one batch's host work (runs in the pool) -----------------------------------------------------------------

@dataclasses.dataclass
class _Ready:
    item: Item
    loaded: Any = None    # image_io.LoadedImage
    prepared: Any = None  # tasks.Prepared
    error: str | None = None


def _load(batch: list[Item], settings: RunSettings) -> list[_Ready]:
    out = []
    for item in batch:
        try:
            loaded = read_image(item.path)
            out.append(_Ready(item, loaded, tasks.prepare(settings.task, loaded.rgb, settings.upscale,
                                                          settings.process_size)))
        except (ImageReadError, ValueError, OSError) as e:
            out.append(_Ready(item, error=str(e)))
    return out


def _finish(ready: _Ready, out: np.ndarray, settings: RunSettings) -> tuple[str, str | None, float]:
    """('written' | 'appeared' | 'failed', message, time done)."""
    item = ready.item
    try:
        final = tasks.finish(settings.task, np.asarray(out), ready.prepared, settings.color_fix)
        alpha = None
        if settings.keep_alpha and ready.loaded.alpha is not None:
            size = (final.shape[1], final.shape[0])
            alpha = np.asarray(Image.fromarray(ready.loaded.alpha, "L").resize(size, Image.BICUBIC))
        done = write_result(item.out, final, alpha, settings.overwrite)
        return ("written" if done else "appeared"), None, time.perf_counter()
    except (OSError, ValueError) as e:
        return "failed", f"cannot write {item.out}: {e}", time.perf_counter()


def _now(fn, *args) -> Future:
    """`fn(*args)` on this thread, as a finished future (the no-overlap path)."""
    f: Future = Future()
    try:
        f.set_result(fn(*args))
    except BaseException as e:  # noqa: BLE001 - re-raised by .result(), as a pool would
        f.set_exception(e)
    return f


def _accepts_on_step(sampler) -> bool:
    try:
        params = inspect.signature(sampler.sample).parameters
    except (TypeError, ValueError):
        return False
    return "on_step" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# --- the loop ---------------------------------------------------------------------------------------------------

class _Run:
    """The state of one `execute`: the summary, the progress bar and the writes still in flight."""

    def __init__(self, plan: Plan, settings: RunSettings, progress: bool):
        self.summary, self.settings = plan.summary, settings
        self.bar = tqdm(total=plan.pending, disable=not progress, unit="img", file=sys.stderr)
        self.writes: collections.deque[tuple[Item, Future]] = collections.deque()
        self.t0 = time.perf_counter()

    def on_step(self, done: int, total: int) -> None:
        self.bar.set_postfix_str(f"step {done}/{total}", refresh=True)

    def record(self, item: Item, status: str, message: str | None = None, when: float | None = None) -> None:
        s = self.summary
        if status == "written":
            s.written.append(item.rel)
            if s.first_image_s is None and when is not None:
                s.first_image_s = when - self.t0
        elif status == "appeared":
            s.appeared.append(item.rel)
        else:
            s.failed.append((item.rel, message or "failed"))
        self.bar.update(1)

    def drain(self, keep: int = 0) -> None:
        """Record finished writes in order; wait while more than `keep` are in flight."""
        while self.writes and (len(self.writes) > keep or self.writes[0][1].done()):
            item, fut = self.writes.popleft()
            self.record(item, *fut.result())


def execute(sampler: Sampler, options, plan: Plan, settings: RunSettings, prompt_fn: PromptFn, *,
            progress: bool = True, stop: Callable[[], bool] | None = None) -> Summary:
    """Sample `plan`'s items into their outputs; `stop()` is asked between batches (a signal was received)."""
    state = _Run(plan, settings, progress)
    batches, sizes, batch_options, processed = [], [], [], []
    for size, group in plan.groups.items():
        bs = batch_size(settings, sampler, options, size)
        group_options, refusal = memory_options(sampler, options, size, bs)
        if refusal is not None:  # found before anything compiles or runs out of memory
            for item in group:
                state.record(item, "failed", refusal)
            continue
        for i in range(0, len(group), bs):
            batches.append(group[i:i + bs])
            sizes.append(bs)
            batch_options.append(group_options)
            processed.append(size)
    pool = ThreadPoolExecutor(settings.io_threads, "pasd-io") if settings.io_threads else None
    submit = pool.submit if pool else _now
    ahead = PREFETCH if pool else 0
    loads: collections.deque[Future] = collections.deque(submit(_load, b, settings) for b in batches[:ahead])
    on_step = state.on_step if progress and _accepts_on_step(sampler) else None
    done, seen = 0, set()
    try:
        for k, batch in enumerate(batches):
            if stop is not None and stop():
                break
            ready = (loads.popleft() if loads else submit(_load, batch, settings)).result()
            if ahead and k + ahead < len(batches):
                loads.append(submit(_load, batches[k + ahead], settings))
            done = k + 1
            note = compile_note(sampler, batch_options[k], processed[k], seen)
            if note and progress:
                state.bar.write(note, file=sys.stderr)
            _sample_batch(sampler, batch_options[k], ready, settings, prompt_fn, state, submit, on_step, sizes[k])
            state.drain(keep=2 * len(batch))  # bounded: decoded results waiting for the encoder cost memory
    finally:
        state.drain()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        state.bar.close()
    plan.summary.pending = sum(len(b) for b in batches[done:])
    plan.summary.sampling_s = time.perf_counter() - state.t0
    return plan.summary


def _sample_batch(sampler, options, ready: list[_Ready], settings: RunSettings, prompt_fn: PromptFn,
                  state: _Run, submit, on_step, pad_to: int) -> None:
    todo = []
    for r in ready:
        if r.error is not None:
            state.record(r.item, "failed", r.error)
        elif not settings.overwrite and r.item.out.exists():  # another run did it since we planned
            state.record(r.item, "appeared")
        else:
            try:
                todo.append((r, prompt_fn(Image.fromarray(r.loaded.rgb, "RGB"), r.item.rel)))
            except (ValueError, OSError) as e:
                state.record(r.item, "failed", f"prompt: {e}")
    if not todo:
        return
    try:
        images = np.stack([r.prepared.lq for r, _ in todo])
        keys = jax.numpy.stack([image_key(settings.seed, r.item.rel) for r, _ in todo])
        kw = {"on_step": on_step} if on_step is not None else {}
        # A short batch is padded to the batch size: reusing the compiled program beats compiling a new one.
        outs = sampler.sample(images, [p for _, p in todo], [settings.negative_prompt] * len(todo), keys, options,
                              pad_to=pad_to, **kw)
    except Exception as e:  # noqa: BLE001 - a failing batch must not end the run
        msg = f"sampling failed: {type(e).__name__}: {e}"
        if not isinstance(e, (ValueError, MemoryError)):
            traceback.print_exc(file=sys.stderr)
        for r, _ in todo:
            state.record(r.item, "failed", msg)
        return
    for (r, _), out in zip(todo, outs):
        state.writes.append((r.item, submit(_finish, r, np.asarray(out), settings)))
