"""`pasd-train` / `python train.py`: train PASD.

    pasd-train --config configs/pasd_v1.py --workdir runs/pasd [--config.x.y=value ...]

Running the same command again resumes from the latest checkpoint in the work dir. The offline demo:
`python train.py --config configs/tiny.py --workdir runs/tiny` (tiny models, procedural images, CPU).
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "training config file (configs/*.py)", lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: checkpoints, metrics.jsonl, TensorBoard events, export")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> int:
    del argv
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    from pasd_jax.errors import PasdError
    from pasd_jax.train.loop import train
    try:
        result = train(flags.FLAGS.config, flags.FLAGS.workdir)
    except (PasdError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{result.status} at step {result.step}: {result.metrics}")
    if result.export_dir is not None:
        print(f"exported the trained UNet and ControlNet (official PyTorch layout) to {result.export_dir}")
    return 0


def run() -> None:
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
