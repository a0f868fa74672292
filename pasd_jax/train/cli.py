"""`pasd-train` / `python train.py`: train PASD.

    pasd-train --config configs/pasd_v1.py --workdir runs/pasd [--config.x.y=value ...] [--resume=latest_intact]

Running the same command again resumes from the latest checkpoint in the work dir. If that checkpoint cannot be
read (a truncated file), the run stops and names it; --resume=latest_intact then resumes from the newest step that
reads, moving the broken ones to <workdir>/broken_checkpoints/ (kept, never deleted). The offline demo:
`python train.py --config configs/tiny.py --workdir runs/tiny` (tiny models, procedural images, CPU).

Exit status:
    0    finished (config.steps reached)
    1    stopped by an error: config, data, an unreadable checkpoint, a non-finite loss (do not requeue)
    2    bad command line (unknown flag, misspelled --config override, bad value)
    143  stopped by SIGTERM (preemption) after saving a checkpoint: requeue, the same command resumes
    130  stopped by SIGINT (Ctrl-C) after saving a checkpoint
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, TensorBoard events, export")
flags.DEFINE_enum("resume", "latest", ["latest", "latest_intact"],
                  "latest: resume from the newest checkpoint (stop if it cannot be read); latest_intact: resume "
                  "from the newest checkpoint that reads, moving broken newer ones to <workdir>/broken_checkpoints/")
flags.mark_flags_as_required(["config", "workdir"])

EXIT_ERROR, EXIT_USAGE, SIGNAL_BASE = 1, 2, 128


def exit_code(status: str, signum: int | None) -> int:
    """0 when finished; 128 + the signal number when a signal stopped the run (143 for SIGTERM), as a shell
    reports a signal death, so schedulers see a preempted run as not finished and requeue it."""
    if status == "preempted":
        return SIGNAL_BASE + int(signum or 15)
    return 0


def override_error(exc: BaseException, argv: list[str]) -> str:
    """One line for a `--config.a.b=v` that names no config field (ml_collections raises with a suggestion)."""
    text = str(exc).replace("\\'", "'").replace("\\n", " ")
    guess = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    names = re.findall(r"'([^'\s]+)'", text)
    bad = guess.group(2) if guess else (names[0] if names else None)
    arg = next((a for a in argv if a.startswith("--config.") and bad and bad in a.split("=")[0].split(".")), None)
    where = arg or "a --config override"
    if bad is None:
        return f"{where}: {text.strip(chr(39))}"
    line = f"{where}: the config has no field {bad!r}"
    if guess:
        line += f"; did you mean {guess.group(1)!r}"
        if arg:
            line += f" ({arg.replace(bad, guess.group(1), 1)})"
        line += "?"
    return line


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose mistakes are one line on stderr (exit 2), not a traceback of ml_collections."""
    try:
        args = flags.FLAGS(argv)
        name = flags.FLAGS["config"].config_filename
        if name and not os.path.isfile(name.split(":")[0]):  # (a traceback stays for errors inside the file)
            raise flags.Error(f"--config {name}: no such config file; the shipped ones are configs/*.py")
        return args
    except flags.Error as e:
        message = str(e)
    except (AttributeError, KeyError) as e:  # an override naming a field the config does not have
        message = override_error(e, argv)
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(EXIT_USAGE)


def main(argv) -> int:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    from pasd_jax.errors import PasdError
    from pasd_jax.train.loop import train
    try:
        result = train(flags.FLAGS.config, flags.FLAGS.workdir, resume=flags.FLAGS.resume)
    except (PasdError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{result.status} at step {result.step}: {result.metrics}")
    if result.export_dir is not None:
        print(f"exported the trained UNet and ControlNet (official PyTorch layout) to {result.export_dir}")
    return exit_code(result.status, result.signal)


def run() -> None:
    """Console-script entry point."""
    main_module = sys.modules.get("__main__")
    if main_module is not None:
        main_module.__doc__ = __doc__  # what --help prints, for `python train.py` and `pasd-train` alike
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
