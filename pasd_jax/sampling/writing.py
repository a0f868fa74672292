"""Writing one result so that concurrent runs into one folder never redo or replace each other's images.

Every PNG is encoded to a temporary name unique to this process and thread, then moved into place. Without
`--overwrite` the move is a hard link, which fails if the name exists: of two runs that sampled the same image
the first to finish keeps its file and the second reports it as appeared meanwhile. On file systems without hard
links the existence check and the rename are separate steps (a narrow race remains there).
"""
from __future__ import annotations

import errno
import os
import pathlib

import numpy as np

from pasd_jax.image_io import write_image
from pasd_jax.safe_write import unique_tag

_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


def write_result(path: pathlib.Path, rgb: np.ndarray, alpha: np.ndarray | None, overwrite: bool) -> bool:
    """Write `path` (PNG); False if it exists and `overwrite` is off (nothing written, nothing replaced)."""
    if overwrite:
        write_image(path, rgb, alpha)  # atomic replace
        return True
    if path.exists():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{unique_tag()}.png")  # hidden: never taken for an input image
    try:
        write_image(tmp, rgb, alpha)
        try:
            os.link(tmp, path)  # atomic, and never replaces a file another run wrote meanwhile
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        tmp.unlink(missing_ok=True)
