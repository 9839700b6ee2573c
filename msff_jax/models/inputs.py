"""The models' input: uint8 images normalised on the device.

Batches travel host-to-device as uint8 (a quarter of float32's bytes); the subtraction
and division happen inside the jitted step, where XLA fuses them into the first
convolution's input. Training, evaluation, the export and Grad-CAM all normalise with
this one function, which lives with the models so that neither training nor inference
imports the other for it.
"""

import jax.numpy as jnp


def normalize_images(images_uint8, mean_rgb, stddev_rgb, dtype=jnp.float32):
    """(x - mean) / stddev per channel, with mean and stddev on the 0..255 scale.

    The arithmetic runs in float32 whatever `dtype` is, so bfloat16's 8-bit mantissa
    only touches the result, not the subtraction.
    """
    images = jnp.asarray(images_uint8).astype(jnp.float32)
    mean = jnp.asarray(mean_rgb, jnp.float32)
    stddev = jnp.asarray(stddev_rgb, jnp.float32)
    return ((images - mean) / stddev).astype(dtype)
