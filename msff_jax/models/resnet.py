"""ResNet-50 v1.5, layer for layer torchvision's `resnet50`.

v1.5: the bottleneck strides on its 3x3 conv (`conv2`), not on the first 1x1.
Stem: 7x7/2 conv (padding 3), BatchNorm, ReLU, 3x3/2 max-pool (padding 1).
BatchNorm: torch defaults, epsilon 1e-5, momentum 0.1 (flax momentum 0.9).
Initialisation is flax's default, not torchvision's (no zero-init of the last BN).

Parameter names (for the torchvision weight converter). A flax path maps to a
state-dict key by joining with '.' and turning every `_<digits>` into `.<digits>`:
  conv1/kernel                   <-> conv1.weight
  bn1/{scale,bias}               <-> bn1.{weight,bias}   (batch_stats mean, var <->
                                     running_mean, running_var)
  layer1_0/conv2/kernel          <-> layer1.0.conv2.weight
  layer2_0/downsample_0/kernel   <-> layer2.0.downsample.0.weight
  layer2_0/downsample_1/scale    <-> layer2.0.downsample.1.weight
  fc/{kernel,bias}               <-> fc.{weight,bias}
Conv kernels are HWIO here and OIHW in torch; dense kernels are (in, out) here and
(out, in) in torch.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from msff_jax.models.layers import (
    ModuleDef,
    conv_and_norm,
    global_average_pool,
    prepare_images,
    torch_padding,
)
from msff_jax.models.max_pool import check_backward, max_pool_3x3


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand x4, plus the (projected) identity."""

    conv: ModuleDef
    norm: ModuleDef
    planes: int
    strides: int = 1
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        out_features = self.planes * self.expansion
        s = (self.strides, self.strides)
        y = self.conv(self.planes, (1, 1), name="conv1")(x)
        y = self.norm(name="bn1", relu=True)(y)
        y = self.conv(self.planes, (3, 3), s, padding=torch_padding(3), name="conv2")(y)
        y = self.norm(name="bn2", relu=True)(y)
        y = self.conv(out_features, (1, 1), name="conv3")(y)
        if self.strides != 1 or x.shape[-1] != out_features:
            x = self.conv(out_features, (1, 1), s, name="downsample_0")(x)
            x = self.norm(name="downsample_1")(x)
        # relu(bn3(y) + x), the shortcut's sum and the ReLU inside BatchNorm's backward.
        return self.norm(name="bn3", relu=True)(y, residual=x)


class ResNet(nn.Module):
    num_classes: int
    stage_sizes: Sequence[int] = (3, 4, 6, 3)  # ResNet-50
    num_filters: int = 64
    norm_momentum: float = 0.9
    norm_epsilon: float = 1e-5
    # How the stem's max-pool is differentiated (`msff_jax.models.max_pool`): the two
    # give the same gradient; 'gather' is deterministic and needs no scatter.
    max_pool_backward: str = "gather"
    # BatchNorm's backward: "two_pass" (batch_norm.BatchNorm) or "autodiff" (flax's own),
    # the same function; an option so a GPU can measure the difference.
    batch_norm_backward: str = "two_pass"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        check_backward(self.max_pool_backward)
        x = prepare_images(images, self.dtype)
        conv, norm = conv_and_norm(
            train=train,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            norm_momentum=self.norm_momentum,
            norm_epsilon=self.norm_epsilon,
            batch_norm_backward=self.batch_norm_backward,
        )
        x = conv(self.num_filters, (7, 7), (2, 2), padding=torch_padding(7), name="conv1")(x)
        x = norm(name="bn1", relu=True)(x)
        x = max_pool_3x3(x, 2, self.max_pool_backward)
        for stage, size in enumerate(self.stage_sizes):
            for block in range(size):
                x = Bottleneck(
                    conv,
                    norm,
                    self.num_filters * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    name=f"layer{stage + 1}_{block}",
                )(x)
        self.sow("intermediates", "features", x)
        x = global_average_pool(x)
        x = nn.Dense(
            self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="fc"
        )(x)
        return jnp.asarray(x, jnp.float32)

