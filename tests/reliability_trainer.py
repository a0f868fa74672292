"""`train.py` with a cheap stand-in for the compiled PASD step, for the reliability tests (tests/test_reliability_*).

Everything around the step is the real one: config checks, data loader and its Grain workers, checkpoints, resume,
signals, metrics, exit codes. Only the step is replaced (the tiny PASD step takes minutes to compile on 2 shared
cores): it adds 1e-3 to every trainable parameter and reports loss 1 (NaN at step $FAKE_NAN_AT), so a checkpoint's
step number is visible in its params.

    python tests/reliability_trainer.py --config configs/tiny.py --workdir RUN [train.py flags ...]
"""
from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def fake_compile_step(models, diffusion, layout, optim, batch_dims, return_grads=False):
    """Same signature as pasd_jax.train.layout.compile_step; the step is jitted (and donates its state) too."""
    import jax
    import jax.numpy as jnp

    nan_at = int(os.environ.get("FAKE_NAN_AT", "0"))

    def step(state, frozen, batch):
        new = dict(state, step=state["step"] + 1)
        new["params"] = jax.tree_util.tree_map(lambda p: p + 1e-3, state["params"])
        loss = jnp.where(new["step"] == nan_at, jnp.nan, jnp.float32(1.0))
        return new, {"loss": loss, "grad_norm": jnp.float32(1.0)}

    return jax.jit(step, donate_argnums=(0,))


def install() -> None:
    from pasd_jax.train import layout as layout_lib

    layout_lib.compile_step = fake_compile_step


if __name__ == "__main__":
    install()
    from pasd_jax.train.cli import run

    run()
