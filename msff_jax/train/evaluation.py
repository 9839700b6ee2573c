"""Evaluation: top-1/top-5, macro and per-class precision/recall/F1, confusion matrix.

Everything is derived from one confusion matrix accumulated on the host (plus a top-k
hit count), so the measures are exact sums over the split, not averages of per-batch
averages. Padding rows of the last batch (mask False) are dropped, so every example is
counted exactly once.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

TOP_K = 5


class EvalAccumulator:
    """Running confusion matrix (rows: true class, columns: predicted) and top-k hits."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.confusion = np.zeros((num_classes, num_classes), np.int64)
        self.top_k_hits = 0
        self.count = 0
        # Per-image answers for WORKDIR/test_predictions.npz (the study's paired tests).
        self._labels, self._predicted, self._top_k, self._index = [], [], [], []

    def update(self, logits, labels, mask, index=None) -> None:
        """`index`: each row's record position in the split (padding rows included), so
        the saved per-image arrays come out in dataset order whatever the process count;
        without it, rows are numbered in the order they arrive."""
        logits = np.asarray(logits)
        labels = np.asarray(labels).astype(np.int64)
        mask = np.asarray(mask).astype(bool)
        if index is None:
            index = self.count + np.arange(int(mask.sum()))
        else:
            index = np.asarray(index).astype(np.int64)[mask]
        logits, labels = logits[mask], labels[mask]
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels outside [0, {self.num_classes}) in an eval batch: "
                             f"{sorted(set(labels.tolist()))[:10]}; does config.num_classes match "
                             "the manifest's class_names?")
        predictions = logits.argmax(-1)
        np.add.at(self.confusion, (labels, predictions), 1)
        k = min(TOP_K, self.num_classes)
        top_k = np.argsort(-logits, axis=-1, kind="stable")[:, :k]
        self.top_k_hits += int((top_k == labels[:, None]).any(-1).sum())
        self.count += int(labels.size)
        self._labels.append(labels.astype(np.int32))
        self._predicted.append(predictions.astype(np.int32))
        self._top_k.append(top_k.astype(np.int16))
        self._index.append(index)

    def per_image(self) -> dict:
        """{'index', 'label', 'predicted', 'top_k'} over every unmasked image, sorted by
        record index (dataset order). `predicted` is the top-1 class (argmax)."""
        if not self._labels:
            return {"index": np.zeros(0, np.int64), "label": np.zeros(0, np.int32),
                    "predicted": np.zeros(0, np.int32),
                    "top_k": np.zeros((0, min(TOP_K, self.num_classes)), np.int16)}
        index = np.concatenate(self._index)
        order = np.argsort(index, kind="stable")
        if np.any(np.diff(index[order]) == 0):
            raise ValueError("evaluation saw an image twice (repeated record index); the "
                             "eval batches overlap")
        return {"index": index[order], "label": np.concatenate(self._labels)[order],
                "predicted": np.concatenate(self._predicted)[order],
                "top_k": np.concatenate(self._top_k)[order]}


def metrics_from_confusion(confusion: np.ndarray) -> dict:
    """Per-class and macro measures; a class never predicted (or absent) scores 0 there,
    as scikit-learn does with `zero_division=0`."""
    confusion = np.asarray(confusion, np.float64)
    true_positives = np.diag(confusion)
    predicted = confusion.sum(0)
    support = confusion.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positives / predicted, 0.0)
        recall = np.where(support > 0, true_positives / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    total = confusion.sum()
    return {
        "top1": float(true_positives.sum() / total) if total else 0.0,
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": support.astype(int).tolist(),
        },
    }


def evaluate(eval_step, variables, global_batches, num_classes: int) -> EvalAccumulator:
    """Runs `eval_step` over an iterable of global batches and accumulates the results."""
    accumulator = EvalAccumulator(num_classes)
    for batch in global_batches:
        out = eval_step(variables, batch)
        index = _global_values(batch["index"]) if "index" in batch else None
        accumulator.update(out["logits"], out["label"], out["mask"], index=index)
    if accumulator.count == 0:
        raise ValueError("the evaluation split produced no examples")
    return accumulator


def _global_values(array) -> np.ndarray:
    """All rows of a global batch array on every process (a collective when the array
    spans several processes: every process calls it for every batch)."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(jax.device_get(array))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


class EvalResults(dict):
    """The eval_results.json document, plus the per-image arrays as an attribute
    (`predictions`, from `EvalAccumulator.per_image`) so they never enter the JSON."""

    predictions: dict | None = None


def eval_results(accumulator: EvalAccumulator, *, model: str, split: str, step: int,
                 class_names, num_params: int) -> dict:
    """The `eval_results.json` document (ARCHITECTURE.md); fractions in 0..1."""
    measures = metrics_from_confusion(accumulator.confusion)
    results = EvalResults({
        "model": model,
        "split": split,
        "step": int(step),
        "num_examples": accumulator.count,
        "top1": measures["top1"],
        "top5": accumulator.top_k_hits / accumulator.count if accumulator.count else 0.0,
        "macro_precision": measures["macro_precision"],
        "macro_recall": measures["macro_recall"],
        "macro_f1": measures["macro_f1"],
        "per_class": measures["per_class"],
        "confusion_matrix": accumulator.confusion.tolist(),
        "class_names": list(class_names),
        "num_params": int(num_params),
    })
    results.predictions = accumulator.per_image()
    return results


def write_eval_results(workdir: str, results: dict, filename: str = "eval_results.json") -> str:
    """Writes atomically (temp file, then rename), so a reader never sees half a file."""
    path = os.path.join(workdir, filename)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)
    return path


PREDICTIONS_FILE = "test_predictions.npz"


def write_predictions(workdir: str, results: dict, filename: str = PREDICTIONS_FILE) -> str | None:
    """Per-image answers of one evaluation as an .npz (np.savez, no pickle): `index`
    (record position in the split), `label`, `predicted` (top-1), `top_k` (int16, best
    first), and 0-d `model`, `split`, `step`. The study report recomputes its statistics
    from these files without a GPU. Written atomically; None when `results` has none."""
    predictions = getattr(results, "predictions", None)
    if predictions is None:
        return None
    path = os.path.join(workdir, filename)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:  # A file object: np.savez would append .npz to a name.
        np.savez(f, **predictions, model=np.str_(results["model"]),
                 split=np.str_(results["split"]), step=np.int64(results["step"]))
    os.replace(tmp, path)
    return path


def plot_confusion_matrix(confusion, class_names, path: str | None = None,
                          title: str = "Confusion matrix") -> np.ndarray:
    """Row-normalised confusion matrix (recall per true class), counts in the cells.

    Saves a PNG at `path` when given and returns the image as uint8 RGB (H, W, 3) for a
    TensorBoard image summary.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confusion = np.asarray(confusion)
    n = len(class_names)
    rows = confusion.sum(1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros(confusion.shape, float), where=rows > 0)
    size = max(5.0, 0.5 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            if confusion[i, j]:
                ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if normalised[i, j] > 0.5 else "black")
    fig.tight_layout()
    if path:
        fig.savefig(path)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
