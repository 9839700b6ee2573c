"""clu's metric writers and periodic actions, or stand-ins where TensorFlow is missing.

clu writes TensorBoard summaries through TensorFlow, and `clu.metric_writers` (hence
`clu.periodic_actions`) fails to import without it. TensorFlow is an optional extra of
this project (`pip install .[tensorboard]`), and hosts such as the GPU machines have no
TensorFlow, so training must not depend on it: without it, `metric_writers` and
`periodic_actions` below are small stand-ins with the few names the training loop
uses. Scalars then still go to the log (clu's `[step] key=value` format) and to
`LOGDIR/scalars.jsonl`; images and TensorBoard event files are not written; one warning
says so.
"""

from __future__ import annotations

import json
import os
import time
import types
from typing import Any, Mapping

from absl import logging

try:
    from clu import metric_writers, periodic_actions  # noqa: F401  (re-exported)

    TENSORBOARD_WRITER = True
except ImportError as _error:  # clu's summary writer imports TensorFlow.
    _IMPORT_ERROR = _error
    TENSORBOARD_WRITER = False

SCALARS_FILE = "scalars.jsonl"
_warned = False


class JsonlLogWriter:
    """clu's MetricWriter interface, the part the loop uses: the log plus a JSONL file."""

    def __init__(self, logdir: str, just_logging: bool = False):
        self._path = None if just_logging else os.path.join(logdir, SCALARS_FILE)
        if self._path:
            os.makedirs(logdir, exist_ok=True)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = {k: float(v) for k, v in scalars.items()}
        logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items())))
        if self._path:
            with open(self._path, "a") as f:
                f.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        del step, images  # TensorBoard images need TensorFlow; PNGs are written elsewhere.

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        logging.info("[Hyperparameters] %s", dict(hparams))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _create_default_writer(logdir: str, *, just_logging: bool = False, **unused) -> JsonlLogWriter:
    global _warned
    if not _warned and not just_logging:
        _warned = True
        logging.warning(
            "TensorFlow is not importable (%s): no TensorBoard summaries in %s; scalars go to "
            "the log and to %s there. Install the 'tensorboard' extra (tensorflow-cpu) for "
            "TensorBoard.", _IMPORT_ERROR, logdir, SCALARS_FILE)
    return JsonlLogWriter(logdir, just_logging=just_logging)


class _ReportProgress:
    """Stand-in for clu's ReportProgress: the loop logs its own images/s, so nothing to do."""

    def __init__(self, **unused):
        pass

    def __call__(self, step: int) -> None:
        del step


class _Profile:
    """Stand-in for clu's Profile: a JAX profiler trace of `num_profile_steps` steps."""

    def __init__(self, *, logdir: str, num_profile_steps: int, first_profile: int, **unused):
        self._logdir, self._first, self._last = logdir, first_profile, first_profile + num_profile_steps
        self._active = False

    def __call__(self, step: int) -> None:
        import jax

        if step == self._first and not self._active:
            jax.profiler.start_trace(self._logdir)
            self._active = True
        elif step >= self._last and self._active:
            jax.profiler.stop_trace()
            self._active = False


if not TENSORBOARD_WRITER:
    metric_writers = types.SimpleNamespace(create_default_writer=_create_default_writer)
    periodic_actions = types.SimpleNamespace(ReportProgress=_ReportProgress, Profile=_Profile)
