"""Writing outputs without ever losing the user's data: guarded folder replacement and atomic files.

Every place that replaces a folder goes through `staged_write`, which refuses an output that is, contains or lies
inside one of the inputs (symlinks resolved), so `--out RUN --overwrite` can never delete the run it reads. Files
are written under a unique temporary name (pid + random) and renamed into place, so concurrent writers never see
each other's half-written files.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import uuid
from typing import Callable, Iterable

from pasd_jax.errors import OutputPathError

PathLike = str | os.PathLike




def _real(path: PathLike) -> pathlib.Path:
    return pathlib.Path(os.path.realpath(pathlib.Path(path).expanduser()))


def refuse_overlap(out: PathLike, inputs: Iterable[PathLike | None], *, flag: str = "--out") -> None:
    """Raise if `out` is an input, contains one, or lies inside one (after resolving symlinks)."""
    o = _real(out)
    for src in inputs:
        if src is None:
            continue
        s = _real(src)
        if o == s:
            how = "is"
        elif s.is_relative_to(o):
            how = "contains"
        elif o.is_relative_to(s):
            how = "lies inside"
        else:
            continue
        raise OutputPathError(f"{flag} {out} {how} the input {src}: writing there could destroy the input; "
                              "choose an output folder outside it")


def refuse_existing(out: PathLike, overwrite: bool, *, flag: str = "--out") -> None:
    if pathlib.Path(out).exists() and not overwrite:
        raise OutputPathError(f"output folder {out} already exists; choose another {flag} or pass --overwrite")


def staged_write(out: PathLike, write: Callable[[pathlib.Path], None], *, inputs: Iterable[PathLike | None] = (),
                 overwrite: bool = False) -> pathlib.Path:
    """Run `write(tmp)` into a fresh folder beside `out`, then move it into place (replacing `out` only if asked).

    `inputs` are the folders and files the content is read from: an `out` overlapping any of them is refused
    before anything is written or removed.
    """
    out = pathlib.Path(out)
    inputs = tuple(inputs)
    refuse_overlap(out, inputs)
    refuse_existing(out, overwrite)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"output {out} is a file, not a folder; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = unique_tag()
    tmp = out.with_name(f".{out.name}.partial-{tag}")
    old = out.with_name(f".{out.name}.old-{tag}")
    try:
        tmp.mkdir()
        write(tmp)
        refuse_overlap(out, inputs)  # a symlink swapped in while writing is still caught
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return out


def unique_tag() -> str:
    """A name part no other process or thread uses at the same time."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:10]}"


def atomic_write(path: PathLike, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """`write(tmp)` to a unique temporary file beside `path`, then rename it over `path` (atomic on POSIX)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{unique_tag()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
