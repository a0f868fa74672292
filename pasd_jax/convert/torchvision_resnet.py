"""torchvision ResNet-50 state dict -> Flax variables for `pasd_jax.models.resnet.ResNet50`.

The expected parameter tree is taken from the Flax model itself (`jax.eval_shape` of `init`), and every leaf is
looked up under its torchvision name. So the converter cannot drift from the model, and a wrong file fails with the
full list of missing, unexpected and mis-shaped keys instead of a half-loaded network.

Layout changes: conv `OIHW` -> `HWIO`, `fc.weight` `(out, in)` -> Dense kernel `(in, out)`; BN `weight`/`bias` ->
`scale`/`bias` (params), `running_mean`/`running_var` -> `mean`/`var` (batch_stats). `num_batches_tracked` has no role
in eval mode and is accepted and dropped.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pasd_jax.convert.io import WeightFileError, load_weights
from pasd_jax.models.resnet import ResNet50

_IGNORED_SUFFIX = ".num_batches_tracked"
_WIDTH_KEY = "layer1.0.conv1.weight"  # [planes * wpg // 64, 64, 1, 1] with planes = 64, so dim 0 == wpg


def infer_width_per_group(state_dict: Mapping[str, np.ndarray]) -> int:
    """`width_per_group` of a torchvision Bottleneck ResNet from its first block's reduce conv."""
    if _WIDTH_KEY not in state_dict:
        raise WeightFileError(f"not a torchvision ResNet state dict: no {_WIDTH_KEY!r} "
                              f"(first keys: {list(state_dict)[:5]})")
    return int(state_dict[_WIDTH_KEY].shape[0])


def _torch_name(path: tuple[str, ...]) -> tuple[str, str]:
    """Flax (collection, *modules, leaf) -> (torch key, kind of transform)."""
    collection, *modules, leaf = path
    module = ".".join(re.sub(r"_(\d+)$", r".\1", m) for m in modules)
    if collection == "batch_stats":
        return f"{module}.running_{leaf}", "vector"
    if leaf == "kernel":
        return f"{module}.weight", ("dense" if module == "fc" else "conv")
    if leaf == "scale":
        return f"{module}.weight", "vector"
    return f"{module}.{leaf}", "vector"  # bias


def _to_flax(arr: np.ndarray, kind: str) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float32)
    if kind == "conv" and arr.ndim == 4:
        return arr.transpose(2, 3, 1, 0)
    if kind == "dense" and arr.ndim == 2:
        return arr.T
    return arr


def _torch_shape(flax_shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == "conv":
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return flax_shape[::-1] if kind == "dense" else flax_shape


def convert_resnet50(state_dict: Mapping[str, np.ndarray], width_per_group: int | None = None,
                     **model_kwargs: Any) -> tuple[ResNet50, dict[str, Any]]:
    """Build the model and its `{"params", "batch_stats"}` variables from a torchvision state dict.

    Args:
      state_dict: torchvision key -> numpy array (any float dtype; stored as float32).
      width_per_group: checked against the weights when given; inferred from them otherwise.
      **model_kwargs: other `ResNet50` fields (`dtype`, `precision`).
    Raises:
      WeightFileError: listing every missing, unexpected and mis-shaped key.
    """
    inferred = infer_width_per_group(state_dict)
    if width_per_group is not None and width_per_group != inferred:
        raise WeightFileError(f"width_per_group={width_per_group} requested but the weights have {inferred}")
    num_classes = int(state_dict["fc.weight"].shape[0]) if "fc.weight" in state_dict else 1000
    model = ResNet50(width_per_group=inferred, num_classes=num_classes, **model_kwargs)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 3, 224, 224), jnp.float32))

    flat, _ = jax.tree_util.tree_flatten_with_path(shapes)
    used: set[str] = set()
    missing, misshaped = [], []
    out: dict[tuple[str, ...], np.ndarray] = {}
    for key_path, leaf in flat:
        path = tuple(k.key for k in key_path)
        name, kind = _torch_name(path)
        if name not in state_dict:
            missing.append(name)
            continue
        used.add(name)
        arr = _to_flax(state_dict[name], kind)
        if arr.shape != tuple(leaf.shape):
            misshaped.append(f"{name}: file {tuple(state_dict[name].shape)}, "
                             f"expected {_torch_shape(tuple(leaf.shape), kind)}")
            continue
        out[path] = arr
    unexpected = [k for k in state_dict if k not in used and not k.endswith(_IGNORED_SUFFIX)]
    if missing or unexpected or misshaped:
        parts = [f"the weights do not match torchvision ResNet-50 (width_per_group={inferred}):"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"  {len(items)} {title}: " + ", ".join(items))
        raise WeightFileError("\n".join(parts))

    variables: dict[str, Any] = {}
    for path, arr in out.items():
        node = variables
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(arr)
    return model, variables


def load_torchvision_resnet50(path: str | os.PathLike, width_per_group: int | None = None,
                              **model_kwargs: Any) -> tuple[ResNet50, dict[str, Any]]:
    """Read a torchvision ResNet-50 weight file (`.safetensors`, or `.pth` with the torch extra) and convert it."""
    try:
        return convert_resnet50(load_weights(path), width_per_group, **model_kwargs)
    except WeightFileError as e:
        if str(path) in str(e):
            raise
        raise WeightFileError(f"{path}: {e}") from e
