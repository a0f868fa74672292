"""`python -m pasd_jax.evaluate`: see `pasd_jax.evaluate.cli`."""
from pasd_jax.evaluate.cli import run

if __name__ == "__main__":
    run()
