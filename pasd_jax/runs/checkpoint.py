"""Orbax checkpoints of a PASD run, and reading them back for export.

One checkpoint step holds four items: `params` (the trainable ControlNet + PACA, fp32), `train` (step, optimizer
state, run RNG key), `data` (each host's loader state, one JSON file per process, as Grain's own handler does) and
`meta` (JSON: config, model configs, variant, where the frozen base lives, loader workers, mesh). The frozen base
is not copied: `meta.base` points at its PyTorch folders. Orbax writes a step into a temporary directory and
renames it only once every item is written, so a failed or interrupted save never replaces the last good step.

Reading a run back as full PASD models (for export or fine-tuning) lives in `pasd_jax.runs.export`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


PARAMS, TRAIN, DATA, META = "params", "train", "data", "meta"
CHECKPOINTS = "checkpoints"


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
        got = self.manager.restore(step, args=ocp.args.Composite(
            **{PARAMS: ocp.args.StandardRestore(abstract_state[PARAMS]), TRAIN: ocp.args.StandardRestore(train),
               DATA: DataRestore(), META: ocp.args.JsonRestore()}))
        return {PARAMS: got[PARAMS], **got[TRAIN]}, got[DATA], dict(got[META])

    def metadata(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no finished checkpoint in {self.directory}")
        return dict(self.manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])

    def restore_params_numpy(self, step: int, abstract_params: Any) -> Any:
        """The trainable params as host numpy arrays, whatever mesh wrote them."""
        target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_params)
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
        got = self.manager.restore(step, args=ocp.args.Composite(
            **{PARAMS: ocp.args.PyTreeRestore(target, restore_args=args)}))
        return got[PARAMS]

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
