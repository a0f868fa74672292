"""`python -m pasd_jax.app`: the web UI (see `pasd_jax.app.cli`)."""
from pasd_jax.app.cli import run

run()
