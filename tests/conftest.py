"""Shared fixtures: where the golden data lives, and a CPU-only, fp32 JAX."""
from __future__ import annotations

import os
import pathlib

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is dominated by XLA compile time of many small programs; skipping LLVM's backend optimisations cuts it
# by about a third and leaves fp32 results within 1e-7 of the optimised build.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

REPO = pathlib.Path(__file__).resolve().parents[1]


def golden_root() -> pathlib.Path:
    """`$PASD_GOLDEN_DIR`, else `../shared/golden` beside the checkout."""
    env = os.environ.get("PASD_GOLDEN_DIR")
    return pathlib.Path(env) if env else REPO.parent / "shared" / "golden"


def shared_root() -> pathlib.Path:
    return golden_root().parent


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    root = golden_root()
    if not root.is_dir():
        pytest.fail(f"golden data not found at {root}: set PASD_GOLDEN_DIR to the shared/golden folder")
    return root


@pytest.fixture(scope="session")
def shared_dir(golden_dir) -> pathlib.Path:
    return golden_dir.parent
