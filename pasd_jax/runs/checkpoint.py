"""Orbax checkpoints of a PASD run, and reading them back for export.

One checkpoint step holds four items: `params` (the trainable ControlNet + PACA, fp32), `train` (step, optimizer
state, run RNG key), `data` (each host's loader state, one JSON file per process, as Grain's own handler does) and
`meta` (JSON: config, model configs, variant, where the frozen base lives, loader workers, mesh). The frozen base
is not copied: `meta.base` points at its PyTorch folders. Orbax writes a step into a temporary directory and
renames it only once every item is written, so a failed or interrupted save never replaces the last good step.

A step that was written but cannot be read back (a file truncated or damaged later, by a full disk or a copy) is
reported as `CheckpointReadError`, naming the step and the item file. Nothing here deletes such a step: a resume
that asks for the newest intact step moves the broken ones aside into `<workdir>/broken_checkpoints/` (so Orbax's
`max_to_keep` cleanup and later saves never touch them) and restores the newest step that reads.

Reading a run back as full PASD models (for export or fine-tuning) lives in `pasd_jax.runs.export`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp

from pasd_jax.errors import WeightFileError
from pasd_jax.safe_write import unique_tag


PARAMS, TRAIN, DATA, META = "params", "train", "data", "meta"
CHECKPOINTS = "checkpoints"
BROKEN = "broken_checkpoints"
T = TypeVar("T")


class CheckpointReadError(WeightFileError):
    """A saved step whose files cannot be read back (truncated, damaged or partly deleted)."""

    def __init__(self, directory: pathlib.Path, step: int, where: str, reason: str, hint: str = ""):
        self.directory, self.step, self.where, self.reason, self.hint = directory, step, where, reason, hint
        super().__init__(f"checkpoint step {step} in {directory} cannot be read: {where} is truncated or damaged "
                         f"({reason})" + (f"; {hint}" if hint else ""))

    def with_hint(self, hint: str) -> CheckpointReadError:
        return CheckpointReadError(self.directory, self.step, self.where, self.reason, hint)


def _chain(exc: BaseException) -> list[BaseException]:
    out, e = [], exc
    while e is not None and len(out) < 10:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _json_item_problem(step_dir: pathlib.Path, item: str) -> str | None:
    """The first file of a JSON item (meta, data) that is missing or does not parse."""
    files = [step_dir / item / "metadata"] if item == META else sorted((step_dir / item).glob("process_*.json"))
    if not (step_dir / item).is_dir():
        return f"{item}/"
    for f in files:
        try:
            json.loads(f.read_text())
        except (OSError, ValueError):
            return str(f.relative_to(step_dir))
    return None


def _read_failure(directory: pathlib.Path, step: int, items: tuple[str, ...], exc: BaseException
                  ) -> CheckpointReadError:
    """Which file of which step failed, from Orbax's / TensorStore's exception chain (one line)."""
    chain = _chain(exc)
    text = " | ".join(str(e) for e in chain)
    step_dir = directory / str(step)
    where = None
    for item in items:
        if item in (META, DATA):
            where = where or _json_item_problem(step_dir, item)
    found = re.search(r'local file "([^"]+)"', text)
    if where is None and found:
        path = pathlib.Path(found.group(1))
        where = f"{path.relative_to(step_dir)}/" if path.is_relative_to(step_dir) else str(path)
        key = re.search(r'Error reading "([^"/]+)', text)
        if key:
            where += f" (array {key.group(1)})"
    if where is None:
        where = "one of " + ", ".join(f"{i}/" for i in items)
    reason = next((str(e) for e in reversed(chain) if str(e)), type(exc).__name__).splitlines()[0]
    reason = re.sub(r"\s+", " ", reason)
    return CheckpointReadError(directory, step, where, reason[:240] + ("..." if len(reason) > 240 else ""))


def _ignore_abandoned_reads() -> None:
    """After a failed restore, TensorStore finishes the step's other reads on the event loop Orbax has closed, and
    each prints "Exception ignored ... Event loop is closed" (a traceback after our one-line error). Those reads
    were abandoned on purpose; only exactly that exception is dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):
        return

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def _reading(directory: pathlib.Path, step: int, items: tuple[str, ...]):
    """Turn any failure to read a step's items into one `CheckpointReadError` (Orbax raises bare Exceptions)."""
    try:
        yield
    except CheckpointReadError:
        raise
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise Exception, ValueError, OSError, ...
        _ignore_abandoned_reads()
        raise _read_failure(directory, step, items, e) from None


class DataStateHandler(ocp.CheckpointHandler):
    """Per-process JSON file of a loader's `get_state()` (each host reads its own data shard)."""

    @staticmethod
    def _file(directory) -> Any:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory, args: DataSave) -> None:
        self._file(directory).write_text(json.dumps(args.state))

    def restore(self, directory, args: DataRestore | None = None) -> Any:
        path = self._file(directory)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the checkpoint was written by a different number of "
                                    "processes, and a loader state belongs to one process's data shard")
        return json.loads(path.read_text())

    def metadata(self, directory) -> None:
        return None

    def finalize(self, directory) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
    pass


class _DropReadOnlyNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


@contextlib.contextmanager
def _quiet_read_only_notice():
    """Orbax warns that a read-only manager's directory is read only; that is the point of opening it so."""
    log, flt = logging.getLogger("absl"), _DropReadOnlyNotice()
    log.addFilter(flt)
    try:
        yield
    finally:
        log.removeFilter(flt)


def checkpoint_dir(path: str | os.PathLike) -> pathlib.Path:
    """A run's work dir (holding checkpoints/) or the checkpoints dir itself."""
    p = pathlib.Path(path)
    return p / CHECKPOINTS if (p / CHECKPOINTS).is_dir() else p


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                                  tree, shardings)


class Checkpoints:
    """CheckpointManager over the four items; saves are async (training continues while arrays are written)."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        if read_only:  # a reader: nothing to keep or clean, and no warnings about it
            options = ocp.CheckpointManagerOptions(max_to_keep=None, save_interval_steps=0, create=False,
                                                   read_only=True, cleanup_tmp_directories=False)
        else:
            options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)
        with _quiet_read_only_notice():
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, state: Mapping[str, Any], data_state: Any, meta: Mapping[str, Any], *,
             wait: bool = False) -> None:
        step = int(jax.device_get(state["step"]))
        train = {k: v for k, v in state.items() if k != PARAMS}
        self.manager.save(step, args=ocp.args.Composite(
            **{PARAMS: ocp.args.StandardSave(state[PARAMS]), TRAIN: ocp.args.StandardSave(train),
               DATA: DataSave(data_state), META: ocp.args.JsonSave(dict(meta, step=step))}), force=True)
        if wait:
            self.wait()

    def restore(self, step: int, abstract_state: Mapping[str, Any]) -> tuple[dict, Any, dict]:
        """(state placed as `abstract_state`'s shardings say, this host's loader state, metadata)."""
        train = {k: v for k, v in abstract_state.items() if k != PARAMS}
        with _reading(self.directory, step, (META, DATA, PARAMS, TRAIN)):
            got = self.manager.restore(step, args=ocp.args.Composite(
                **{PARAMS: ocp.args.StandardRestore(abstract_state[PARAMS]), TRAIN: ocp.args.StandardRestore(train),
                   DATA: DataRestore(), META: ocp.args.JsonRestore()}))
        return {PARAMS: got[PARAMS], **got[TRAIN]}, got[DATA], dict(got[META])

    def metadata(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        with _reading(self.directory, step, (META,)):
            return dict(self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])

    def restore_params_numpy(self, step: int, abstract_params: Any) -> Any:
        """The trainable params as host numpy arrays, whatever mesh wrote them."""
        target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params)
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        with _reading(self.directory, step, (PARAMS,)):
            got = self.manager.restore(step, args=ocp.args.Composite(
                **{PARAMS: ocp.args.PyTreeRestore(target, restore_args=args)}))
        return got[PARAMS]

    def newest_readable(self, read: Callable[[int], T], *, fallback: bool, at_most: int | None = None
                        ) -> tuple[int | None, T | None, list[CheckpointReadError]]:
        """(step, read(step), errors of the newer steps that failed) for the newest step that `read` can read.

        Without `fallback` the newest step's error is raised as it is (the caller adds what to do about it)."""
        broken: list[CheckpointReadError] = []
        for step in sorted(self.all_steps(), reverse=True):
            if at_most is not None and step > at_most:
                continue
            try:
                return step, read(step), broken
            except CheckpointReadError as e:
                if not fallback:
                    raise
                broken.append(e)
        if broken:
            raise broken[0].with_hint(f"no step in {self.directory} can be read (tried "
                                      f"{', '.join(str(e.step) for e in broken)})")
        return None, None, broken

    def set_aside(self, step: int) -> pathlib.Path:
        """Move an unreadable step out of the manager's reach (its cleanup would delete it, a save would collide
        with it) into `<workdir>/broken_checkpoints/`, where it is kept for inspection; never deleted."""
        src = self.directory / str(step)
        root = self.directory.parent / BROKEN
        dest = root / str(step)
        if dest.exists():
            dest = root / f"{step}-{unique_tag()}"
        root.mkdir(parents=True, exist_ok=True)
        os.rename(src, dest)
        self.manager.reload()
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def relative_base(base: Mapping[str, str], workdir: str | os.PathLike) -> dict[str, str]:
    """Base folders inside the work dir are stored relative to it, so a run directory can be moved."""
    root = pathlib.Path(workdir).absolute()
    out = {}
    for kind, path in base.items():
        p = pathlib.Path(path).absolute()
        out[kind] = str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
    return out


def resolve_base(base: Mapping[str, str], workdir: str | os.PathLike) -> dict[str, str]:
    return {k: str(pathlib.Path(workdir) / v) if not os.path.isabs(v) else v for k, v in base.items()}


def read_metadata(path: str | os.PathLike, step: int | None = None) -> dict:
    """The `meta` item of a run (latest step by default), with base folders made absolute."""
    ckdir = checkpoint_dir(path)
    ck = Checkpoints(ckdir, read_only=True)
    try:
        meta = ck.metadata(step)
    finally:
        ck.close()
    meta["base"] = resolve_base(meta["base"], ckdir.parent)
    return meta
