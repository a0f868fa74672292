"""The training loop: validate, set up the mesh and state (fresh or resumed), step, log, checkpoint, export.

Robustness rules: the config is validated before anything is built or compiled; a non-finite loss or gradient
norm stops the run before any checkpoint could hold it (metrics are checked one step behind, so the device never
waits, and always before a save); SIGTERM/SIGINT (preemption) saves the current step and returns; a resumed run
continues bit-for-bit (same RNG draws, same data order) as long as the loader's worker count is unchanged; a saved
step that cannot be read back stops the run with its name, or is set aside under `--resume=latest_intact`
(`resume.py`); nothing is created in the work dir before the config and data checks have passed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import pathlib
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Self

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.convert import hub
from pasd_jax.convert.folders import CONTROLNET, UNET
from pasd_jax.schedulers.schedule import alphas_cumprod_from_betas, effective_config, load_config, make_betas
from pasd_jax.runs import checkpoint as ckpt_lib
from pasd_jax.train import data as data_lib
from pasd_jax.train import layout as layout_lib
from pasd_jax.train import resume as resume_lib
from pasd_jax.train import setup
from pasd_jax import distributed, sharding
from pasd_jax.sharding import trainable_split
from pasd_jax.runs.export import export_pytorch, run_scheduler_to_export, write_scheduler_beside
from pasd_jax.train.metrics import BadDataLog, MetricsWriter
from pasd_jax.models.bundle import Models
from pasd_jax.runs.models import build_models, cast, load_frozen
from pasd_jax.train.step import Diffusion
from pasd_jax.errors import ConfigError, PasdError
from pasd_jax.train.config_checks import validate
from pasd_jax.train.validation import Validator

IteratorFactory = Callable[..., Iterator]
COLORFULNESS_REPEATS = {"official": 3, "single": 1}


class NonFiniteLossError(PasdError, RuntimeError):
    """The loss or gradient norm became NaN/inf; no checkpoint was written from that state."""


@dataclasses.dataclass
class RunResult:
    step: int
    status: str                      # "finished" | "preempted"
    metrics: dict[str, float]        # the last logged row
    export_dir: pathlib.Path | None = None
    signal: int | None = None        # the signal that preempted the run (the CLI exits with 128 + it)


def init_distributed(dc) -> None:
    """jax.distributed.initialize() with pasd-sample's launch rules; unset values are auto-detected from the
    cluster environment."""
    distributed.initialize(distributed.launch_from(
        "on", dc.coordinator_address or None, int(dc.num_processes) if int(dc.num_processes) > 0 else None,
        int(dc.process_id) if int(dc.process_id) >= 0 else None))


def resolve_hub_names(config) -> None:
    """`model.base` given as a Hugging Face name (`org/name[@rev][:subfolder]`) -> its folder in the HF cache,
    fetched (UNet, VAE, text encoder, tokenizer, scheduler) as pasd-sample fetches its base; local paths win."""
    base = config.model.base
    if base and hub.is_hub_name(base):
        with config.unlocked():
            config.model.base = str(hub.resolve_base(base, components=(UNET, "vae", "text_encoder"),
                                                     flag="model.base"))


@functools.lru_cache(maxsize=4)
def null_ids(tokenizer_path: str) -> tuple[int, ...]:
    """Token ids of the empty caption, made by the loader's own tokenize (so they match real captions)."""
    from pasd_jax.tokenizer import load_tokenizer, tokenize
    return tuple(int(i) for i in tokenize(load_tokenizer(tokenizer_path), ""))


def make_diffusion(config) -> Diffusion:
    """The DDPM training schedule (from the SD scheduler config) and the conditioning rules of the config."""
    sched = effective_config(load_config(config.diffusion.scheduler), "ddim")
    if sched["prediction_type"] not in ("epsilon", "v_prediction"):
        raise ConfigError(f"{config.diffusion.scheduler}: prediction_type {sched['prediction_type']!r} is not "
                          "supported for training (epsilon or v_prediction)")
    abar = alphas_cumprod_from_betas(make_betas(sched))
    d = config.diffusion
    terms = d.get("colorfulness_terms", "official")   # colorization loss (train.losses): 3x as official, or once
    if terms not in COLORFULNESS_REPEATS:
        raise ConfigError(f"diffusion.colorfulness_terms={terms!r}: expected one of {tuple(COLORFULNESS_REPEATS)}")
    return Diffusion(alphas_cumprod=tuple(float(a) for a in abar),
                     null_ids=null_ids(config.loader.tokenizer),
                     null_text_ratio=float(config.diffusion.null_text_ratio),
                     prediction_type=sched["prediction_type"], dr_weight=float(config.diffusion.dr_loss_weight),
                     conditioning_scale=float(config.model.conditioning_scale),
                     colorfulness_weight=float(d.get("colorfulness_weight", 0.0)),
                     colorfulness_repeats=COLORFULNESS_REPEATS[terms],
                     colorfulness_batch=int(d.get("colorfulness_batch", 4)))


class StopSignals:
    """SIGTERM/SIGINT set a flag the loop polls at step boundaries; a second SIGINT interrupts at once."""

    def __init__(self):
        self.received: int | None = None
        self.previous = {}

    def _handler(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> Self:
        for s in (signal.SIGTERM, signal.SIGINT):
            self.previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)

    def agreed(self) -> bool:
        """True on every host once any host got a signal (all hosts must save the same step)."""
        local = self.received is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils
        return bool(np.max(multihost_utils.process_allgather(np.int32(local))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _check_resume(meta: Mapping[str, Any], config) -> None:
    if meta["variant"] != config.model.variant:
        raise ConfigError(f"the checkpoint is a {meta['variant']} run but model.variant={config.model.variant!r}")
    if int(meta["num_workers"]) != int(config.loader.num_workers) and config.loader.source != "synthetic":
        raise ConfigError(f"loader.num_workers={config.loader.num_workers} but the checkpoint was written with "
                          f"{meta['num_workers']} loader workers: the loader state is tied to the worker count; "
                          f"resume with --config.loader.num_workers={meta['num_workers']}")
    if int(meta["process_count"]) != jax.process_count():
        raise ConfigError(f"the checkpoint was written by {meta['process_count']} processes, this run has "
                          f"{jax.process_count()}: each host's loader state belongs to its data shard")


@dataclasses.dataclass
class _Run:
    """Everything a run needs before its first step."""
    configs: dict[str, dict]
    models: Models
    layout: layout_lib.Layout
    step_fn: Any
    state: dict
    frozen: dict
    base: dict[str, str]
    meta: dict[str, Any]
    data_state: Any
    latest: int | None
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Plan:
    """The cheap part of the setup: the step to resume from and its metadata (checked against the config)."""
    latest: int | None
    previous: dict | None
    configs: dict[str, dict]
    models: Models
    broken: list[ckpt_lib.CheckpointReadError]


def _plan(config, reader: ckpt_lib.Checkpoints | None, resume: str) -> _Plan:
    latest, previous, broken = resume_lib.newest(reader, reader.metadata if reader else None, resume)
    if previous is not None:
        _check_resume(previous, config)
    configs = previous["model_configs"] if previous else setup.model_config_dicts(config.model)
    models = build_models(configs, config.model.variant, jnp.dtype(config.model.compute_dtype),
                          bool(config.model.remat))
    return _Plan(latest, previous, configs, models, broken)


def _prepare(config, workdir: pathlib.Path, reader: ckpt_lib.Checkpoints | None, plan: _Plan,
             resume: str) -> _Run:
    """Mesh layout, state (fresh, or restored into this mesh), frozen params and the compiled step."""
    latest, previous, configs, models = plan.latest, plan.previous, plan.configs, plan.models
    dtype = jnp.dtype(config.model.compute_dtype)
    names = tuple(config.model.trainable)
    optim = layout_lib.freeze(config.optim)
    rules = tuple((str(r), tuple(a)) for r, a in config.sharding.rules)
    mesh = sharding.make_mesh(dict(config.mesh))
    layout = layout_lib.make_layout(models, names, dtype.name, optim, mesh, rules, int(config.sharding.min_size))
    data_state, notes = None, []
    if previous is None:
        trainable, frozen, base = setup.fresh_start(config, models, configs, workdir)
        _sync("pasd_base_written")
        state = layout_lib.create_state(layout, trainable, optim, jax.random.PRNGKey(int(config.seed)))
    else:
        base = ckpt_lib.resolve_base(previous["base"], workdir)
        frozen = load_frozen(models, base, names)
        abstract_state = layout.abstract_state()
        step, (state, data_state, restored_meta), broken = resume_lib.newest(
            reader, lambda s: reader.restore(s, abstract_state), resume, at_most=latest)
        _check_resume(restored_meta, config)
        broken = plan.broken + broken  # metadata or arrays unreadable; set aside only once an older step restored
        if broken:
            notes = resume_lib.set_aside(reader, broken, step)
            _sync("pasd_broken_steps_set_aside")
        latest = step
    frozen = sharding.put(cast(frozen, dtype), layout.frozen_sh)
    accum = int(config.grad_accum)
    step_fn = layout_lib.compile_step(models, make_diffusion(config), layout, optim,
                                      (accum, int(config.batch_size) // accum, int(config.data.crop_size)))
    meta = {"variant": models.variant, "config": config.to_json_best_effort(), "model_configs": configs,
            "base": ckpt_lib.relative_base(base, workdir), "trainable": list(names),
            "num_workers": int(config.loader.num_workers), "process_count": jax.process_count(),
            "mesh": dict(mesh.shape), "jax_version": jax.__version__}
    return _Run(configs, models, layout, step_fn, state, frozen, base, meta, data_state, latest, notes)


def train(config, workdir: str | pathlib.Path, *, make_iterator: IteratorFactory | None = None,
          resume: str = resume_lib.LATEST) -> RunResult:
    """Train (or resume) the run in `workdir` up to `config.steps` optimizer steps.

    `resume`: "latest" stops on a step that cannot be read; "latest_intact" sets it aside and resumes from the
    newest step that reads (see `pasd_jax.train.resume`)."""
    t_start = time.perf_counter()
    if config.distributed.enabled:
        init_distributed(config.distributed)
    resolve_hub_names(config)
    validate(config, n_devices=jax.device_count(), process_count=jax.process_count())
    resume_lib.check_mode(resume)
    workdir = pathlib.Path(workdir).absolute()
    ckdir = workdir / ckpt_lib.CHECKPOINTS
    with contextlib.ExitStack() as stack:
        reader = ckpt_lib.Checkpoints(ckdir, read_only=True) if ckdir.is_dir() else None  # creates nothing
        if reader is not None:
            stack.callback(reader.close)
        plan = _plan(config, reader, resume)
        # The loader opens (and probes its sources) before anything compiles: a bad data path fails in seconds,
        # and before anything is written into the work dir.
        iterator = (make_iterator or data_lib.make_iterator)(
            config, process_index=jax.process_index(), process_count=jax.process_count(),
            vocab_size=plan.models.text_encoder.config.vocab_size)
        stack.callback(getattr(iterator, "close", lambda: None))
        run = _prepare(config, workdir, reader, plan, resume)
        ckpts = ckpt_lib.Checkpoints(ckdir, max_to_keep=int(config.max_to_keep))
        stack.callback(ckpts.close)
        if run.data_state is not None:
            iterator.set_state(run.data_state)
        result, state = _steps(config, run, iterator, ckpts, workdir, t_start)
        ckpts.wait()
    if result.status == "finished" and config.export_at_end:
        result.export_dir = export_live(run.configs, run.models.variant, state["params"], run.base,
                                        tuple(config.model.trainable),
                                        workdir / "export" / f"checkpoint-{result.step}",
                                        scheduler=run_scheduler_to_export(config))
    return result


def _steps(config, run: _Run, iterator: Iterator, ckpts: ckpt_lib.Checkpoints, workdir: pathlib.Path,
           t_start: float) -> tuple[RunResult, dict]:
    """The step loop; returns the result and the final state."""
    state, layout = run.state, run.layout
    run.state = None  # donated to the first step
    step = int(jax.device_get(state["step"]))
    accum, crop, steps = int(config.grad_accum), int(config.data.crop_size), int(config.steps)
    writer = MetricsWriter(workdir, total_steps=steps, start_step=step, enabled=jax.process_index() == 0,
                           progress=bool(config.progress))
    writer.message(f"{'resumed from' if run.latest else 'new run at'} step {step} in {workdir}: "
                   f"{run.models.variant}, {trainable_split.count(layout.trainable) / 1e6:.1f}M trainable params, mesh "
                   f"{dict(layout.mesh.shape)}, ready in {time.perf_counter() - t_start:.1f}s (setup + compile)")
    for note in run.notes:
        writer.message(note)
    loop = _Loop(config, ckpts, writer, last_saved=run.latest)
    bad_log = BadDataLog(workdir, writer.message, process_index=jax.process_index())
    validation = config.get("validation")
    validator = Validator(config, run.models, workdir) if validation and int(validation.every) else None
    status = "finished"
    try:
        with StopSignals() as signals:
            while step < steps:
                raw = next(iterator)
                arrays, counters = data_lib.split_counters(raw)
                bad_log.add(step + 1, data_lib.bad_records(raw))
                del raw  # the loader's (shared-memory) batch goes now; the step reads copies
                batch = data_lib.to_global(arrays, accum, crop, layout.batch_sh)
                state, metrics = run.step_fn(state, run.frozen, batch)
                step += 1
                loop.check_pending()                    # the previous step's metrics, while this one runs
                loop.pending = (step, metrics, counters)
                stop = signals.agreed()
                if stop or step % int(config.checkpoint_every) == 0 or step == steps:
                    loop.check_pending()                # nothing non-finite is ever saved
                    ckpts.save(state, iterator.get_state(), run.meta, wait=stop)
                    loop.last_saved = step
                if validator is not None and not stop and validator.due(step):
                    loop.check_pending()
                    _validate(validator, step, state, run.frozen, writer)
                    loop.t0 = time.perf_counter()       # validation time is not training throughput
                if stop:
                    status = "preempted"
                    writer.message(f"stopped by signal {signals.received} at step {step}; checkpoint saved in "
                                   f"{ckpts.directory}; run the same command to resume")
                    break
            loop.check_pending()
    finally:
        writer.close()
    return RunResult(step=step, status=status, metrics=loop.last_row,
                     signal=signals.received if status == "preempted" else None), state


def _validate(validator: Validator, step: int, state: dict, frozen: dict, writer: MetricsWriter) -> None:
    """Validation samples; a failure (out of memory, images removed) is reported and training goes on."""
    try:
        summary = validator(step, state["params"], frozen)
    except Exception as e:  # noqa: BLE001 - a validation sample is never worth a training run
        writer.message(f"validation samples of step {step} failed ({type(e).__name__}: {e}); training continues")
        return
    if summary is not None:
        writer.message(f"validation samples of step {step}: {summary.report().splitlines()[0]}")


class _Loop:
    """Host-side bookkeeping: finite checks, metric windows, throughput."""

    def __init__(self, config, ckpts: ckpt_lib.Checkpoints, writer: MetricsWriter, last_saved: int | None):
        self.config, self.ckpts, self.writer = config, ckpts, writer
        self.last_saved = last_saved
        self.pending: tuple[int, dict, dict] | None = None
        self.window: list[dict[str, float]] = []
        self.counts: dict[str, int] = {}
        self.last_row: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def check_pending(self) -> None:
        if self.pending is None:
            return
        step, metrics, counters = self.pending
        self.pending = None
        row = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])):
            self.ckpts.wait()
            kept = (f"the last good checkpoint is step {self.last_saved} in {self.ckpts.directory}"
                    if self.last_saved is not None else "no checkpoint was written")
            raise NonFiniteLossError(
                f"non-finite training values at step {step} (loss={row['loss']}, grad_norm={row['grad_norm']}); "
                f"nothing from this state was saved and {kept}. Lower optim.lr, check the data and the base "
                "weights, or use a float32 compute_dtype to locate the overflow.")
        self.window.append(row)
        for k, v in counters.items():
            self.counts[k] = self.counts.get(k, 0) + v
        self.writer.advance()
        if step % int(self.config.log_every) == 0 or step == int(self.config.steps):
            self.log(step)

    def log(self, step: int) -> None:
        now = time.perf_counter()
        n = len(self.window)
        row = {k: float(np.mean([w[k] for w in self.window])) for k in self.window[-1]}  # means over the window
        row.update(self.counts)                                                           # totals over the window
        row["samples_per_s"] = n * int(self.config.batch_size) / max(now - self.t0, 1e-9)
        row["steps_per_s"] = n / max(now - self.t0, 1e-9)
        self.writer.write(step, row)
        self.last_row = {"step": step, **row}
        self.window, self.counts, self.t0 = [], {}, now


def export_live(configs: Mapping[str, dict], variant: str, params: Any, base: Mapping[str, str],
                names: tuple[str, ...], folder: pathlib.Path, scheduler: str | None = None) -> pathlib.Path | None:
    """Write the trained models in the official layout (process 0); the frozen base is re-read in fp32 so the
    SD weights in the exported UNet are the base's exact values, not the compute-dtype copy used in training.
    `scheduler`: a scheduler config written to `scheduler/` beside the folder (the colorization release layout)."""
    trained = sharding.to_host(params)                 # collective: every host takes part
    if jax.process_index() != 0:
        return None
    fp32 = build_models(configs, variant)
    unet_frozen = load_frozen(fp32, base, names, kinds=(UNET,))[UNET]
    unet = trainable_split.merge(unet_frozen, trained[UNET])
    out = export_pytorch((fp32.unet, unet), (fp32.controlnet, trained[CONTROLNET]), folder)
    if scheduler:
        write_scheduler_beside(out, scheduler)
    return out
