"""ResNet-50 in Flax linen with torchvision's block structure, for PASD's classification prompts.

PASD's `--high_level_info classification` labels the LQ image with torchvision's ResNet-50 (IMAGENET1K_V2). This port
keeps torchvision's exact topology so that converted torchvision weights give the same logits:
- Bottleneck blocks [3, 4, 6, 3], expansion 4, stride on the 3x3 conv ("ResNet v1.5"), 1x1 conv + BN shortcut on
  the first block of each stage;
- `width_per_group` sets only the inner width of a Bottleneck (`planes * width_per_group // 64`): 64 for the real
  model, 8 in the narrow golden network, so it is a field rather than a constant;
- eval-mode BatchNorm from the running statistics, eps 1e-5 (torchvision's default).

Input and output follow the project convention: NCHW pixels in (as torchvision's preprocessing produces them),
logits `[B, num_classes]` out; NHWC inside, where XLA's convolutions are fastest. Module names mirror torchvision's
state-dict keys (`layer2_0/downsample_0` for `layer2.0.downsample.0`) so the converter is a mechanical rename.
Intermediate activations are sown into the `intermediates` collection for debugging and parity tests.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

BN_EPS = 1e-5  # torchvision nn.BatchNorm2d default


def _bn(name: str) -> nn.BatchNorm:
    # Inference only: PASD never trains the classifier, so the running statistics are always used.
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, momentum=0.9, dtype=jnp.float32, name=name)


def _conv(features: int, kernel: int, stride: int, name: str, dtype: jnp.dtype,
          precision: jax.lax.PrecisionLike) -> nn.Conv:
    pad = kernel // 2  # torchvision pads 7x7 by 3, 3x3 by 1, 1x1 by 0
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, precision=precision, name=name)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck: 1x1 reduce, 3x3 (carries the stride), 1x1 expand, + shortcut, ReLU."""

    planes: int
    width: int
    stride: int = 1
    downsample: bool = False
    dtype: jnp.dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(_conv, dtype=self.dtype, precision=self.precision)
        out = nn.relu(_bn("bn1")(conv(self.width, 1, 1, "conv1")(x)))
        out = nn.relu(_bn("bn2")(conv(self.width, 3, self.stride, "conv2")(out)))
        out = _bn("bn3")(conv(self.planes * 4, 1, 1, "conv3")(out))
        shortcut = x
        if self.downsample:
            shortcut = _bn("downsample_1")(conv(self.planes * 4, 1, self.stride, "downsample_0")(x))
        return nn.relu(out + shortcut)


class ResNet50(nn.Module):
    """torchvision `ResNet(Bottleneck, layers, width_per_group=...)` in eval mode.

    Attributes:
      width_per_group: inner Bottleneck width per 64 planes (64 = real ResNet-50, 8 = the golden network).
      num_classes: size of the `fc` head (1000 for ImageNet).
      layers: blocks per stage; [3, 4, 6, 3] is ResNet-50.
      dtype: compute dtype of the convolutions; BatchNorm and the head always run in float32.
      precision: matmul/conv precision; `HIGHEST` keeps GPUs from using TF32, whose ~1e-3 logit error could move
        a borderline image across PASD's 0.1 probability threshold (one 224x224 image: the cost is nil).
    """

    width_per_group: int = 64
    num_classes: int = 1000
    layers: Sequence[int] = (3, 4, 6, 3)
    dtype: jnp.dtype = jnp.float32
    precision: jax.lax.PrecisionLike = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """NCHW normalised pixels `[B, 3, H, W]` -> logits `[B, num_classes]` (float32)."""
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)
        x = nn.relu(_bn("bn1")(_conv(64, 7, 2, "conv1", self.dtype, self.precision)(x)))
        # torchvision pads the max pool with -inf, which is what flax's max_pool padding does.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        self.sow("intermediates", "stem", x)
        in_features = 64
        for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers), start=1):
            width = planes * self.width_per_group // 64
            for b in range(blocks):
                stride = 2 if (b == 0 and stage > 1) else 1
                downsample = b == 0 and (stride != 1 or in_features != planes * 4)
                x = Bottleneck(planes, width, stride, downsample, self.dtype, self.precision,
                               name=f"layer{stage}_{b}")(x)
                in_features = planes * 4
            self.sow("intermediates", f"layer{stage}", x)
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        self.sow("intermediates", "pooled", pooled)
        return nn.Dense(self.num_classes, dtype=jnp.float32, precision=self.precision, name="fc")(pooled)
