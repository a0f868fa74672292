"""A persistent XLA compilation cache for `pasd-sample`: the second run reads its programs instead of compiling.

Default location: `$JAX_COMPILATION_CACHE_DIR` if set, else `$XDG_CACHE_HOME/pasd_jax/xla` or
`~/.cache/pasd_jax/xla`; `--compile-cache DIR` picks another, `--no-compile-cache` turns it off. Programs that
compile in under `MIN_COMPILE_S` are not stored (reading them back would not be faster than compiling them); every
entry size is kept. The cache only affects compile time: a cached program computes exactly what a fresh one does.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator

MIN_COMPILE_S = 0.5
_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
         "jax_persistent_cache_min_entry_size_bytes", "jax_enable_compilation_cache")


def default_dir() -> pathlib.Path:
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if env:
        return pathlib.Path(env).expanduser()
    root = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    return root / "pasd_jax" / "xla"


@contextlib.contextmanager
def persistent_cache(directory: str | os.PathLike | None, *, enabled: bool = True,
                     min_compile_s: float = MIN_COMPILE_S) -> Iterator[pathlib.Path | None]:
    """Use `directory` (default: `default_dir()`) as JAX's compilation cache inside the block, then restore the
    previous settings (callers that run the CLI in-process, such as tests, keep their own)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    previous = {k: getattr(jax.config, k) for k in _KEYS}
    folder = None
    if enabled:
        folder = pathlib.Path(directory).expanduser() if directory else default_dir()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            folder = None  # an unwritable cache costs compile time, never the run
    try:
        if folder is None:
            jax.config.update("jax_enable_compilation_cache", False)
        else:
            jax.config.update("jax_enable_compilation_cache", True)
            jax.config.update("jax_compilation_cache_dir", str(folder))
            jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_s))
            jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
        cc.reset_cache()  # the cache object is created once per process: make it see the new settings
        yield folder
    finally:
        for k, v in previous.items():
            jax.config.update(k, v)
        cc.reset_cache()
