"""What `pasd-sample` does around the sampler for big folders and several hosts (README "Many images, many hosts").

A session (a context manager around the CLI's main) owns: the SIGTERM/SIGINT handlers, the persistent
compilation cache, the multi-process runtime, the plan (checked before any weight is loaded, so a finished
folder ends in a second), Hugging Face names of the weights, and `summary.json`.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from typing import Any, Self

from pasd_jax import distributed
from pasd_jax.sampling import compile_cache
from pasd_jax.sampling.plan import Plan, check_output, make_plan
from pasd_jax.sampling.signals import Interrupted, StopSignals
from pasd_jax.sampling.summary import SUMMARY_FILE, Summary, merge, write_summary

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("many images, many hosts")
    g.add_argument("--io-threads", type=int, default=4, help="host threads decoding, colour-fixing and encoding "
                   "neighbouring images while the device samples (0: one after the other)")
    g.add_argument("--compile-cache", default=None, metavar="DIR", help="persistent XLA compilation cache "
                   "(default $JAX_COMPILATION_CACHE_DIR or ~/.cache/pasd_jax/xla)")
    g.add_argument("--no-compile-cache", action="store_true", help="compile every program afresh")
    g.add_argument("--distributed", default="auto", choices=list(distributed.MODES),
                   help="jax.distributed over several processes/hosts, each sampling its share of the files; auto: "
                   "when an address/count/id is given (flags or JAX_* variables) or a SLURM/MPI/TPU job is seen")
    g.add_argument("--coordinator-address", default=None, metavar="HOST:PORT", help="process 0's address")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


class Session:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.signals = StopSignals()
        self.plan_: Plan | None = None
        self._stack = contextlib.ExitStack()
        self.process = (0, 1)

    def __enter__(self) -> Self:
        self._stack.enter_context(self.signals)
        self._stack.enter_context(compile_cache.persistent_cache(
            self.args.compile_cache, enabled=not self.args.no_compile_cache))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    # --- before any weight ---------------------------------------------------------------------------------

    def plan(self, settings) -> Plan:
        """Start the multi-process runtime if asked, check the output folder, and plan this process's share."""
        a = self.args
        launch = distributed.launch_from(a.distributed, a.coordinator_address, a.num_processes, a.process_id)
        if distributed.initialize(launch):
            self.process = distributed.process()
            log.info("process %d of %d, %d local devices", *self.process, len(self.devices or ()))
        check_output(a.output, a.input)
        self.plan_ = make_plan(a.input, a.output, settings, process=self.process)
        s = self.plan_.summary
        log.info("%d images to sample%s%s", self.plan_.pending,
                 f", {len(s.existing)} already done" if s.existing else "",
                 f" (this process's share of {self.process[1]})" if self.process[1] > 1 else "")
        return self.plan_

    @property
    def devices(self) -> list[Any] | None:
        """This process's devices when several processes run (each samples its own files), else all."""
        if self.process[1] == 1:
            return None
        import jax
        return jax.local_devices()

    def weights(self, ckpt: str, base: str | None) -> tuple[str, str | None]:
        """Hugging Face names (`org/name[:subfolder]`) -> folders in the HF cache; local paths unchanged."""
        from pasd_jax.convert import hub

        subfolder = getattr(self.args, "ckpt_subfolder", None)
        if subfolder or hub.is_hub_name(ckpt):
            ckpt = str(hub.resolve_pasd(ckpt, subfolder=subfolder))
        if base is not None and hub.is_hub_name(base):
            base = str(hub.resolve_base(base))
        return ckpt, base

    # --- sampling and the end --------------------------------------------------------------------------------

    def execute(self, sampler, options, plan: Plan, settings, prompt_fn) -> int:
        from pasd_jax.sampling.runner import execute

        self.signals.deferred()  # from here a signal stops the run between batches
        summary = execute(sampler, options, plan, settings, prompt_fn, progress=not self.args.no_progress,
                          stop=self.signals.stopping)
        return self.finish(summary)

    def finish(self, summary: Summary) -> int:
        """Write summary.json (merged over processes), print the report, return the exit code."""
        import pathlib

        output = pathlib.Path(self.args.output)
        summary.interrupted = self.signals.name
        index, count = self.process
        shown = summary
        if count == 1:
            write_summary(summary, output)
        elif summary.interrupted:  # the other processes may still be running: no collective
            write_summary(summary, output, f"summary.process-{index}-of-{count}.json")
        else:
            merged = merge([Summary.from_json(p) for p in distributed.allgather_json(summary.to_json())])
            if index == 0:
                write_summary(merged, output)
                shown = merged
        print(shown.report(), file=sys.stderr)
        if self.plan_ is not None and self.plan_.pending == 0 and not summary.interrupted:
            print(f"nothing to sample{' in this share' if count > 1 else ''}; no weights were loaded",
                  file=sys.stderr)
        if summary.interrupted:
            return self.signals.exit_code
        return shown.exit_code

    def interrupted(self) -> int:
        """A signal before sampling began (while loading): report what the plan knew, exit 128 + signal."""
        summary = self.plan_.summary if self.plan_ is not None else None
        if summary is None:
            print(f"stopped by {self.signals.name} before any image was planned", file=sys.stderr)
            return self.signals.exit_code
        summary.pending = self.plan_.pending
        return self.finish(summary)


def run_main(args: argparse.Namespace, body) -> int:
    """`body(args, session)` inside a session; a signal before sampling still writes summary.json."""
    with Session(args) as session:
        try:
            return body(args, session)
        except Interrupted:
            return session.interrupted()


__all__ = ["SUMMARY_FILE", "Session", "add_arguments", "run_main"]
