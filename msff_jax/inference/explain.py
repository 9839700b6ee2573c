"""Where the model looks: IASM spatial attention maps and Grad-CAM, overlaid on images.

The paper claims IASM makes the network attend to the product rather than the
background. For models with IASM blocks (`msff_iasm`, `msff_ecomnet`) we show the
spatial attention map `M_s` each block sows into `'intermediates'`
(`'spatial_attention'`, `(batch, h, w, 1)`), one panel per stage: consecutive blocks at
one resolution form a stage and the stage's last block is shown, since that is the map
whose output feeds the next stage.

Models without IASM (the baselines, `msff_base`, `msff_msp`) get Grad-CAM (Selvaraju et
al. 2017) of the last stage: the feature map `A` every model sows as `'features'`, weighted
per channel by the spatial mean of d(top-class logit)/dA, summed over channels, ReLU.

How we get d(logit)/dA without changing the models: flax's `perturb` would need the
model to call it, and `sow` only records a value, it does not put anything into the
data flow. But each of our models sows, as `'features'`, exactly the value some
submodule call returned (the last block or conv unit). So:
1. a first, shape-only trace (`jax.eval_shape`) runs the model under
   `nn.intercept_methods`, records every submodule `__call__` output in order and finds
   the call whose output *is* the sown `'features'` object;
2. the real pass intercepts that same call (same position in the same deterministic
   call order) and returns `output + perturbation`, with `perturbation` a zero array that
   is an argument of the function we differentiate. d(logit)/d(perturbation) equals
   d(logit)/dA, and the values are unchanged because the perturbation is zero.
A model whose features are not a submodule's output gets a clear error rather than a
wrong map.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_KEY = "spatial_attention"
FEATURES_KEY = "features"


@dataclasses.dataclass(frozen=True)
class HeatMap:
    """One panel: a (h, w) map for one image, with where it came from."""

    title: str
    values: np.ndarray  # (h, w), raw (attention in 0..1, Grad-CAM >= 0)


@dataclasses.dataclass(frozen=True)
class Explanation:
    kind: str  # 'attention' or 'gradcam'
    panels: list[HeatMap]
    predicted_class: int
    logits: Optional[np.ndarray] = None  # The model's, to compare with the artifact's.


# ----------------------------------------------------------------------------- sown values


def find_sown(tree: Any, key: str, prefix: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """('path/to/module', value) of every value sown under `key`, in the order the
    modules were called (dict insertion order; no sorting)."""
    found = []
    for name, value in tree.items():
        path = prefix + (str(name),)
        if name == key:
            found += [("/".join(prefix) or "<model>", v) for v in value]
        elif isinstance(value, dict) or hasattr(value, "items"):
            found += find_sown(value, key, path)
    return found


def group_by_stage(maps: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """The last map of every run of consecutive maps at one resolution (one per stage)."""
    groups: list[tuple[str, Any]] = []
    previous_shape = None
    for path, value in maps:
        shape = tuple(value.shape[1:3])
        if shape == previous_shape:
            groups[-1] = (path, value)
        else:
            groups.append((path, value))
        previous_shape = shape
    return groups


# ----------------------------------------------------------------------------- Grad-CAM


class _FeatureProbe:
    """Finds which submodule call (in call order) returns the sown features."""

    def __init__(self, model: nn.Module, variables: dict):
        self.model, self.variables = model, variables

    def locate(self, images: jax.ShapeDtypeStruct) -> tuple[int, jax.ShapeDtypeStruct]:
        found: dict[str, Any] = {}

        def trace(x):
            outputs = []

            def record(next_fun, args, kwargs, context):
                out = next_fun(*args, **kwargs)
                if context.method_name == "__call__":
                    outputs.append(out)
                return out

            with nn.intercept_methods(record):
                _, state = self.model.apply(self.variables, x, train=False,
                                            mutable=["intermediates"])
            sown = find_sown(state["intermediates"], FEATURES_KEY)
            if len(sown) != 1:
                raise ValueError(f"{type(self.model).__name__} sows {len(sown)} "
                                 f"'{FEATURES_KEY}' values; Grad-CAM needs exactly one")
            features = sown[0][1]
            matches = [i for i, out in enumerate(outputs) if out is features]
            if not matches:
                raise ValueError(
                    f"{type(self.model).__name__}'s sown '{FEATURES_KEY}' is not the output "
                    "of a submodule call, so Grad-CAM cannot perturb it")
            found["index"] = matches[0]
            return features

        features = jax.eval_shape(trace, images)
        return found["index"], features


def make_grad_cam(model: nn.Module, variables: dict, image_shape: tuple[int, ...],
                  dtype=jnp.float32):
    """A jitted `normalised images -> (logits, cam (b, h, w))` for the top class."""
    index, features = _FeatureProbe(model, variables).locate(
        jax.ShapeDtypeStruct(image_shape, dtype))

    def forward(perturbation, images):
        counter = itertools.count()

        def add_perturbation(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and next(counter) == index:
                out = out + perturbation
            return out

        with nn.intercept_methods(add_perturbation):
            logits, state = model.apply(variables, images, train=False,
                                        mutable=["intermediates"])
        (_, activations), = find_sown(state["intermediates"], FEATURES_KEY)
        target = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
        score = jnp.take_along_axis(logits, target[:, None], axis=-1).sum()
        return score, (logits, activations)

    @jax.jit
    def grad_cam(images):
        zeros = jnp.zeros((images.shape[0],) + features.shape[1:], features.dtype)
        grads, (logits, activations) = jax.grad(forward, has_aux=True)(zeros, images)
        grads = grads.astype(jnp.float32)
        weights = grads.mean(axis=(1, 2))  # (b, c): how much each channel raises the logit
        cam = jnp.einsum("bhwc,bc->bhw", activations.astype(jnp.float32), weights)
        return logits, jax.nn.relu(cam)

    return grad_cam


def make_attention(model: nn.Module, variables: dict):
    """A jitted `normalised images -> (logits, [(b, h, w, 1), ...])`, maps in call
    order (their paths come from `find_sown` on an abstract trace: jit returns arrays)."""

    @jax.jit
    def attention(images):
        logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
        return logits, [value for _, value in find_sown(state["intermediates"], ATTENTION_KEY)]

    return attention


class Explainer:
    """Attention maps when the model has IASM blocks, else Grad-CAM."""

    def __init__(self, model: nn.Module, variables: dict, *, image_size: int,
                 mean_rgb: Sequence[float], stddev_rgb: Sequence[float], dtype=jnp.float32):
        from msff_jax.models.inputs import normalize_images

        self._normalize = lambda images: normalize_images(images, mean_rgb, stddev_rgb, dtype)
        shape = (1, image_size, image_size, 3)
        _, sown = jax.eval_shape(
            lambda x: model.apply(variables, x, train=False, mutable=["intermediates"]),
            jax.ShapeDtypeStruct(shape, dtype))
        self._attention_paths = [path for path, _ in find_sown(sown["intermediates"], ATTENTION_KEY)]
        self.kind = "attention" if self._attention_paths else "gradcam"
        if self.kind == "attention":
            self._attention = make_attention(model, variables)
        else:
            self._grad_cam = make_grad_cam(model, variables, shape, dtype)

    def explain(self, images_uint8: np.ndarray) -> list[Explanation]:
        images = self._normalize(images_uint8)
        if self.kind == "attention":
            logits, maps = self._attention(images)
            stages = group_by_stage(list(zip(self._attention_paths, maps)))
            panels = [[HeatMap(f"{path} ({v.shape[1]}x{v.shape[2]})", np.asarray(v[i, ..., 0]))
                       for path, v in stages] for i in range(len(images))]
        else:
            logits, cam = self._grad_cam(images)
            cam = np.asarray(cam)
            panels = [[HeatMap(f"Grad-CAM, last stage ({cam.shape[1]}x{cam.shape[2]})", cam[i])]
                      for i in range(len(images))]
        logits = np.asarray(logits, np.float32)
        top = np.argmax(logits, axis=-1)
        return [Explanation(self.kind, panels[i], int(top[i]), logits[i]) for i in range(len(images))]


# ----------------------------------------------------------------------------- drawing


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """`heat` min-max scaled, resized bilinearly to the image and blended with the
    'jet' colour map. Returns uint8 RGB like `image`."""
    from matplotlib import colormaps
    from PIL import Image

    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    resized = Image.fromarray((255 * scaled).astype(np.uint8)).resize(
        (image.shape[1], image.shape[0]), Image.Resampling.BILINEAR)
    colour = colormaps["jet"](np.asarray(resized) / 255.0)[..., :3]
    blended = (1 - alpha) * image.astype(np.float32) / 255.0 + alpha * colour
    return (255 * np.clip(blended, 0, 1)).astype(np.uint8)


def save_explanation(path: Path, image: np.ndarray, explanation: Explanation,
                     caption: str) -> Path:
    """One PNG: the input, then one overlaid panel per map, titled with the map's
    source and its raw range (overlays are min-max scaled, the range says by what)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = 1 + len(explanation.panels)
    figure, axes = plt.subplots(1, count, figsize=(2.6 * count, 3.0), squeeze=False)
    axes = axes[0]
    axes[0].imshow(image)
    axes[0].set_title("input", fontsize=8)
    for axis, panel in zip(axes[1:], explanation.panels):
        axis.imshow(overlay(image, panel.values))
        axis.set_title(f"{panel.title}\nrange {panel.values.min():.3g}..{panel.values.max():.3g}",
                       fontsize=7)
    for axis in axes:
        axis.axis("off")
    figure.suptitle(caption, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.9))  # leave the top band to the caption
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def explainer_from_export(export_dir: Path, metadata: Optional[dict] = None) -> Explainer:
    """Model code + the export's Orbax variables (predict's artifact alone cannot give
    intermediate values or gradients)."""
    from msff_jax.inference.export import load_metadata, load_model_and_variables

    metadata = metadata or load_metadata(export_dir)
    model, variables = load_model_and_variables(export_dir, metadata)
    applied = metadata["artifact"]["normalization"]  # What the artifact normalises with.
    return Explainer(model, variables, image_size=metadata["preprocessing"]["image_size"],
                     mean_rgb=applied["mean_rgb"], stddev_rgb=applied["stddev_rgb"],
                     dtype=jnp.dtype(metadata["dtype"]))
