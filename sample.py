"""`python sample.py ...` is `pasd-sample ...`: see `pasd_jax/sampling/cli.py` or `--help`."""
import sys

from pasd_jax.sampling.cli import main

if __name__ == "__main__":
    sys.exit(main())
