"""Each degradation op against PASD's official torch/basicsr op, on small fixed inputs stored with its outputs.

`tests/data/degradation_op_refs.npz` was written by `tools/degradation_stats/make_op_refs.py` in a separate torch
venv (see that folder's README); the case list is `tools/degradation_stats/op_cases.py`, which also holds how
each case calls our op. No torch is needed here. The noise ops replay the random fields torch drew.
"""
from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
REFS = REPO / "tests" / "data" / "degradation_op_refs.npz"
sys.path.insert(0, str(REPO / "tools" / "degradation_stats"))

from op_cases import KERNEL_FAMILIES, KINDS, Case, build_cases, max_abs, ours  # noqa: E402

ULP1 = float(np.spacing(np.float32(1.0)))  # 1.19e-7: one float32 step at 1.0

# Largest |ours - official| allowed per op kind, and the measured distance that justifies it (torch 2.13.0 CPU,
# numpy 2.4.6, opencv 5.1.0; the measured values are printed by this test and by make_op_refs.py).
TOL = {
    # float64 closed forms on both sides, evaluated in a different order: measured <= 1.1e-16 here, 5.6e-16 over
    # 200 random draws (check_ops.py); 2e-15 is ~10 float64 steps at 1.0.
    "kernel": 2e-15,
    # float32 ops: the bound is the official op's own float32 rounding (|official f32 - official f64|, stored
    # per case, measured 6e-8..3.5e-6) doubled, plus 2 float32 steps at 1.0; see F64_KINDS below. Measured:
    # blur <= 1.25e-6 (official f32 vs f64 1.22e-6), resizes <= 3.4e-6 (official f32 vs f64 3.5e-6).
    "blur": None,
    "resize_by": None,
    "resize_to": None,
    # our field * f32(sigma / 255) vs torch's (field * sigma) / 255: the noise differs in its last bit and the
    # sum x + noise then lands at most one float32 step apart; measured 6.0e-8 (half a step at 1.0).
    "gaussian_noise": ULP1,
    # same float32 operations in the same order as basicsr (counts / vals - x_q, * scale, + x, clip): measured 0;
    # one step at 1.0 allows another operation order.
    "poisson_noise": ULP1,
    # float DCT as GEMMs in another summation order than torch's products: measured <= 2.4e-7 (two steps at 1.0);
    # 1e-6 leaves 4x. On 512 px inputs (check_ops.py) single coefficients within float32 noise of a rounding tie
    # round differently (max up to 6e-2, float64 siding with either); the stored inputs have none (every
    # coefficient >= 41x its float32 noise from a tie, `tie_margin`), so a coefficient rounded the other way here
    # (>= 5e-5) is a real change.
    "jpeg": 1e-6,
    # round half to even, clamp, / 255 on both sides, including the exact (k + 0.5) / 255 ties: measured 0.
    "quantise": 0.0,
}
F64_KINDS = ("blur", "resize_by", "resize_to")


def f64_bound(f32_vs_f64: float) -> float:
    """Allowed error for a float32 op whose official float32 result is `f32_vs_f64` from its float64 result."""
    return 2.0 * f32_vs_f64 + 2.0 * ULP1


@pytest.fixture(scope="module")
def refs() -> tuple[dict[str, np.ndarray], list[Case], dict[str, np.ndarray], dict]:
    if not REFS.is_file():
        pytest.fail(f"{REFS} missing: regenerate it with tools/degradation_stats/make_op_refs.py (see README)")
    with np.load(REFS) as z:
        meta = json.loads(str(z["meta"]))
        imgs = {k[4:]: z[k] for k in z.files if k.startswith("img/")}
        outs = {k[4:]: z[k] for k in z.files if k.startswith("out/")}
        fields = {k[6:]: z[k] for k in z.files if k.startswith("field/")}
    cases = [Case(c["name"], c["kind"], c["params"], fields.get(c["name"])) for c in meta["cases"]]
    return imgs, cases, outs, {c["name"]: c for c in meta["cases"]}


def test_stored_cases_are_the_current_op_list(refs):
    _, cases, _, _ = refs
    _, current = build_cases()
    assert [(c.name, c.kind) for c in cases] == [(c.name, c.kind) for c in current], (
        "op_cases.build_cases changed: regenerate tests/data/degradation_op_refs.npz with make_op_refs.py")
    assert {c.kind for c in cases} == set(KINDS)
    assert {c.params["family"] for c in cases if c.kind == "kernel"} == set(KERNEL_FAMILIES)
    assert REFS.stat().st_size < 700 * 1024


@pytest.mark.parametrize("kind", KINDS)
def test_op_matches_official(refs, kind):
    imgs, cases, outs, meta = refs
    failures = []
    worst = 0.0
    for case in (c for c in cases if c.kind == kind):
        err = max_abs(ours(case, imgs), outs[case.name])
        worst = max(worst, err)
        if kind in F64_KINDS:
            d64 = meta[case.name]["f32_vs_f64"]
            tol = f64_bound(d64)
            print(f"{case.name:34s} max|ours - official| {err:.3g}  official f32 vs f64 {d64:.3g}  tol {tol:.3g}")
        else:
            tol = TOL[kind]
            extra = f"  tie margin {meta[case.name]['tie_margin']:.3g}" if kind == "jpeg" else ""
            print(f"{case.name:34s} max|ours - official| {err:.3g}  tol {tol:.3g}{extra}")
        if not err <= tol:
            failures.append(f"{case.name}: {err:.3g} > {tol:.3g}")
    print(f"{kind}: worst {worst:.3g}")
    assert not failures, failures
