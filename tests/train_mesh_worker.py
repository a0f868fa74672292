"""Subprocess worker for tests/test_train_sharding.py: the same PASD train steps on several meshes of 8 fake CPU
devices, compared with one device. Prints one JSON line with the measured differences.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/train_mesh_worker.py OVERRIDES_JSON WORKDIR
"""
from __future__ import annotations

import json
import os
import pathlib
import sys
import time

T0 = time.perf_counter()

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np

from configs import tiny
from pasd_jax.runs import checkpoint as ckpt_lib
from pasd_jax.train import data as data_lib
from pasd_jax.train import layout as layout_lib
from pasd_jax.train import loop, setup
from pasd_jax import sharding
from pasd_jax.sharding import trainable_split
from pasd_jax.runs.models import build_models

STEPS, EXTRA = 3, 2
MESHES = {"1": (1, 1), "8x1": (8, 1), "2x4": (2, 4), "1x8": (1, 8)}
# (path, mesh) -> expected PartitionSpec under the default rules with min_size 0
CHECKED = ("controlnet/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel",
           "controlnet/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel",
           "controlnet/controlnet_down_blocks_0/kernel",
           "controlnet/conv_in/bias",
           "unet/up_blocks_0/pixel_attentions_0/transformer_blocks_0/ff/net_0/proj/kernel")


def apply_overrides(config, overrides: dict) -> None:
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| / max |b| (0 when both vanish)."""
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return float(np.max(np.abs(a - b))) / scale if scale else float(np.max(np.abs(a - b), initial=0.0))


def tree_rel(a, b) -> float:
    fa, fb = trainable_split.flatten(a), trainable_split.flatten(b)
    assert fa.keys() == fb.keys()
    return max(rel(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class Runner:
    """Builds, compiles and steps the run of one (mesh, grad_accum) from the shared starting params."""

    def __init__(self, overrides: dict, workdir: pathlib.Path):
        self.config = tiny.get_config()
        apply_overrides(self.config, overrides)
        c = self.config
        configs = setup.model_config_dicts(c.model)
        self.models = build_models(configs, c.model.variant)
        self.diffusion = loop.make_diffusion(c)
        self.optim = layout_lib.freeze(c.optim)
        self.rules = tuple((r, tuple(a)) for r, a in c.sharding.rules)
        self.trainable, self.frozen_np, _ = setup.fresh_start(c, self.models, configs, workdir / "fresh")

    def layout(self, data: int, fsdp: int):
        mesh = sharding.make_mesh({"data": data, "fsdp": fsdp, "tensor": 1}, jax.devices()[: data * fsdp])
        return layout_lib.make_layout(self.models, tuple(self.config.model.trainable), "float32", self.optim,
                                      mesh, self.rules, self.config.sharding.min_size)

    def compiled(self, data: int, fsdp: int, accum: int):
        lay = self.layout(data, fsdp)
        c = self.config
        return lay, layout_lib.compile_step(self.models, self.diffusion, lay, self.optim,
                                            (accum, c.batch_size // accum, c.data.crop_size), return_grads=True)

    def start(self, data: int, fsdp: int, accum: int):
        c = self.config.copy_and_resolve_references()
        c.grad_accum = accum
        lay, fn = self.compiled(data, fsdp, accum)
        state = layout_lib.create_state(lay, self.trainable, self.optim, jax.random.PRNGKey(c.seed))
        frozen = sharding.put(self.frozen_np, lay.frozen_sh)
        it = data_lib.make_iterator(c, process_index=0, process_count=1, vocab_size=49408)
        step = lambda st: fn(st, frozen, data_lib.to_global(next(it), accum, c.data.crop_size,
                                                            lay.batch_sh))
        return lay, state, it, step

    def run(self, data: int, fsdp: int, accum: int = 1) -> dict:
        lay, state, it, step = self.start(data, fsdp, accum)
        losses, grads = [], None
        for s in range(STEPS):
            state, m = step(state)
            losses.append(float(m["loss"]))
            if s == 0:
                grads = sharding.to_host(m["grads"])
        flat = trainable_split.flatten(state["params"])
        frozen_spec = list(lay.frozen_sh["text_encoder"]["text_model"]["embeddings"]["token_embedding"]
                           ["embedding"].spec)
        out = {"losses": losses, "grads": grads, "params": sharding.to_host(state["params"]),
               "specs": {p: list(flat[p].sharding.spec) for p in CHECKED},
               "shard_shapes": {p: list(flat[p].addressable_shards[0].data.shape) for p in CHECKED},
               "mu_spec": list(trainable_split.flatten(state["opt_state"][1][0].mu)[CHECKED[0]].sharding.spec),
               "frozen_embedding_spec": frozen_spec}
        log(f"ran mesh ({data}, {fsdp}), grad_accum {accum}")
        return out, state, it, step


def main(overrides: dict, workdir: pathlib.Path) -> dict:
    runner = Runner(overrides, workdir)
    log("fresh start")
    runs = {}
    for name, (data, fsdp) in MESHES.items():
        runs[name], state, it, step = runner.run(data, fsdp)
        if name == "2x4":  # checkpoint here, then continue: the reference for restoring onto another mesh
            ck = ckpt_lib.Checkpoints(workdir / "ck")
            ck.save(state, it.get_state(), {"note": "mesh test"}, wait=True)
            ck.close()
            more = []
            for _ in range(EXTRA):
                state, m = step(state)
                more.append(float(m["loss"]))
            saved_params = runs[name]["params"]
    accum = runner.run(1, 1, accum=2)[0]

    # Restore the (2, 4) checkpoint onto the (1, 8) mesh and take the next steps there.
    lay, _, it, step = runner.start(1, 8, 1)
    ck = ckpt_lib.Checkpoints(workdir / "ck")
    restored, data_state, _ = ck.restore(STEPS, lay.abstract_state())
    ck.close()
    it.set_state(data_state)
    restored_params = sharding.to_host(restored["params"])
    bitwise = all(np.array_equal(np.asarray(trainable_split.flatten(restored_params)[k]), np.asarray(v))
                  for k, v in trainable_split.flatten(saved_params).items())
    placed = list(trainable_split.flatten(restored["params"])[CHECKED[0]].sharding.spec)
    after = []
    for _ in range(EXTRA):
        restored, m = step(restored)
        after.append(float(m["loss"]))

    def compare(r: dict, ref: dict) -> dict:
        return {"loss_rel": max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"])),
                "grad_rel": tree_rel(r["grads"], ref["grads"]), "param_rel": tree_rel(r["params"], ref["params"])}

    out = {"device_count": jax.device_count(), "losses": {k: r["losses"] for k, r in runs.items()}, "meshes": {}}
    for name, r in runs.items():
        out["meshes"][name] = {**compare(r, runs["1"]), **{k: r[k] for k in
                                                          ("specs", "shard_shapes", "mu_spec",
                                                           "frozen_embedding_spec")}}
    out["accum"] = {**compare(accum, runs["1"]), "losses": accum["losses"]}
    out["restore"] = {"bitwise": bitwise, "placed_spec": placed, "losses": after, "reference": more}
    return out


if __name__ == "__main__":
    result = main(json.loads(sys.argv[1]), pathlib.Path(sys.argv[2]))
    print("RESULT " + json.dumps(result))
