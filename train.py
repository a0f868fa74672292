"""`python train.py ...` is `pasd-train ...`: see `pasd_jax/train/cli.py` or `--help`."""
from pasd_jax.train.cli import run

if __name__ == "__main__":
    run()
