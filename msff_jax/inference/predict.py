"""Classify image files with an exported model.

    msff-predict --export_dir runs/msff_ecomnet/export photo.jpg shop/ \
        [--top_k 5] [--json] [--batch_size 32] [--explain OUT_DIR]

(or `python -m msff_jax.inference.predict ...`; `--help` lists the flags).

Inference runs the `jax.export` artifact alone (no model code); images go through the
evaluation transform of `data_pipeline.records.transforms` (short side to
`image_size / crop_fraction`, centre crop) with the parameters stored in export.json, so
a prediction sees exactly what evaluation saw.

Folders are searched recursively and every file in them is tried. A file that cannot be
used (not an image, truncated, larger than `--max_image_pixels`: a decompression bomb,
or a file over `--max_file_mb`, an empty file, a FIFO or a device, which is never
opened) is named once on stderr with the reason and skipped; the others still run, and
a final count of skipped files follows. Before any image, the export directory is
checked to be itself (`export.load_export`: SHA-256s, keys, paths, normalisation), and
with `--explain` the model code and variables are checked to give the artifact's logits. A
progress bar is drawn on stderr only when it is a terminal.

Exit status: 0 when every file was classified, 2 when some were skipped, 1 when nothing
could be classified (bad export directory, empty folder, all files skipped).

`--explain OUT_DIR` also writes one PNG per image with the IASM spatial attention of
each stage (MSFF models with IASM) or Grad-CAM of the last stage (other models); this
needs the model code and the export's Orbax variables (see `msff_jax.inference.explain`).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
from absl import flags

from msff_jax import console

DEFAULT_MAX_FILE_MB = 256
PROGRAM = "msff-predict"

# Its own FlagValues: predict's flags never clash with another program's in one process.
FLAGS = flags.FlagValues()
flags.DEFINE_string("export_dir", None, "WORKDIR/export of a trained run (launch.py --mode export).",
                    flag_values=FLAGS)
flags.DEFINE_integer("top_k", 5, "Classes to print per image.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_bool("json", False, "One JSON object per line instead of text.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 32, "Images per call of the artifact.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_string("explain", None, "OUT_DIR: write attention / Grad-CAM overlays here.",
                    flag_values=FLAGS)
flags.DEFINE_integer("max_image_pixels", None, "Refuse images with more pixels (default: "
                     "PIL's limit, ~89 M).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float("max_file_mb", DEFAULT_MAX_FILE_MB, "Refuse larger files.", lower_bound=0,
                   flag_values=FLAGS)
flags.mark_flag_as_required("export_dir", flag_values=FLAGS)
console.define_common_flags(FLAGS)


class InputError(console.UserError, ValueError):
    """Command-line input that leaves nothing to do (missing path, empty folder)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> types.SimpleNamespace:
    """Flags and IMAGE_OR_FOLDER arguments (argv without the program name); a bad flag
    prints one line and exits 2."""
    inputs = console.parse_flags(FLAGS, argv, program=PROGRAM, doc=__doc__.split("\n\n")[0])
    if not inputs:
        console.error_line(f"name at least one IMAGE_OR_FOLDER (`{PROGRAM} --help` lists the flags)")
        raise SystemExit(console.EXIT_USAGE)
    names = ("export_dir", "top_k", "json", "batch_size", "explain", "max_image_pixels",
             "max_file_mb", "verbosity", "show_traceback")
    return types.SimpleNamespace(inputs=inputs, **{name: FLAGS[name].value for name in names})


def collect_files(inputs: Iterable[str]) -> list[Path]:
    """Files named directly, and every entry but folders under named folders (sorted,
    recursive, hidden ones skipped; a FIFO or device among them is skipped later, named);
    a file reached twice is kept once. A name that is no file nor folder is refused
    saying what it is (a FIFO, a device, a dangling link)."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if not p.is_dir() and not any(part.startswith(".")
                                                         for part in p.relative_to(path).parts))
            if not found:
                raise InputError(f"folder {path} contains no files")
            files += found
        elif path.is_file():
            files.append(path)
        elif os.path.lexists(path):
            raise InputError(f"{path} is {console.what_is(path) or 'not a regular file'}, not an "
                             "image file or a folder; name image files or folders of them")
        else:
            raise InputError(f"{path}: no such file or folder")
    seen: set[Path] = set()
    unique = []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def skip_reason(path: Path, err: BaseException) -> str:
    """Why a file was skipped, in plain words: decoders nest their messages, so repeated
    'cannot decode image' prefixes are folded into one."""
    text = " ".join(str(err).split())
    decode = text.startswith("cannot decode image")
    text = re.sub(r"(cannot decode image(?: \(\d+ bytes\))?:?\s*)+", "", text).strip()
    if "not in any image format Pillow knows" in text:
        return "not an image (its contents match no image format Pillow reads)"
    if isinstance(err, OSError) and not isinstance(err, ValueError):
        return f"unreadable ({err.strerror or text})"
    if decode:
        if "truncated" in text.lower():
            return f"truncated or damaged image ({text})" if text else "truncated image"
        return f"cannot decode image ({text})" if text else "cannot decode image"
    return text


def _decode_errors() -> tuple[type[BaseException], ...]:
    """What a corrupt file can raise inside the eval transform (OpenCV has its own type)."""
    try:
        import cv2
    except ImportError:
        return (ValueError, OSError, SyntaxError)
    return (ValueError, OSError, SyntaxError, cv2.error)


def check_header(data: bytes) -> tuple[int, int]:
    """(width, height) from the header alone, refusing non-images and decompression
    bombs before any pixel is decoded: PIL's MAX_IMAGE_PIXELS check runs on open, and
    its warning (between the limit and twice it) is turned into an error here."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                return image.size
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise ValueError(f"decompression bomb refused: {err}") from err
        except Image.UnidentifiedImageError as err:
            raise ValueError("cannot decode image: not in any image format Pillow knows") from err
        except Exception as err:  # UnidentifiedImageError, OSError, SyntaxError...
            raise ValueError(f"cannot decode image: {err}") from err


def load_image(path: Path, image_size: int, crop_fraction: float, max_file_bytes: float,
               version: Optional[int] = None) -> np.ndarray:
    """One file through the eval transform, `transforms.decode_resize_center_crop`: the
    same function evaluation runs during training and in `--mode eval`, at the version
    export.json's `preprocessing` block records (load_export has checked it is one this
    code computes; None: the current one), so predict feeds the artifact the pixels
    evaluation saw. ValueError with the reason when the file is unusable."""
    from data_pipeline.records.transforms import EVAL_PREPROCESSING_VERSION, decode_resize_center_crop

    size = path.stat().st_size
    if size > max_file_bytes:
        raise ValueError(f"file of {size / 2**20:.0f} MB exceeds --max_file_mb")
    data = path.read_bytes()
    check_header(data)
    try:
        return decode_resize_center_crop(data, image_size, crop_fraction,
                                         EVAL_PREPROCESSING_VERSION if version is None else version)
    except _decode_errors() as err:
        raise ValueError(f"cannot decode image: {err}") from err


def top_predictions(probabilities: np.ndarray, class_names: Sequence[str], k: int) -> list[dict]:
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"class": class_names[i], "index": int(i), "probability": float(probabilities[i])}
            for i in order]


def format_text(path: Path, predictions: list[dict]) -> str:
    width = max(len(p["class"]) for p in predictions)
    lines = [str(path)]
    lines += [f"  {rank}. {p['class']:<{width}}  {100 * p['probability']:6.2f}%"
              for rank, p in enumerate(predictions, start=1)]
    return "\n".join(lines)


def format_json(path: Path, predictions: list[dict]) -> str:
    return json.dumps({"file": str(path), "predictions": predictions})


def _batches(files: list[Path], batch_size: int) -> Iterator[list[Path]]:
    for start in range(0, len(files), batch_size):
        yield files[start:start + batch_size]


def _unique_png(out_dir: Path, source: Path, used: set[str]) -> Path:
    name, counter = f"{source.stem}.png", 1
    while name in used:
        name, counter = f"{source.stem}_{counter}.png", counter + 1
    used.add(name)
    return out_dir / name


def check_same_model(exported, artifact_logits: np.ndarray, model_logits: np.ndarray) -> None:
    """The overlays must explain the probabilities printed beside them: the model code
    with the export's variables must give the artifact's logits (up to the compute
    dtype's rounding). The SHA-256 checks make this hold for an intact export; this
    proves it for the very images being explained."""
    from msff_jax.inference.export import ExportError

    dtype = exported.metadata["dtype"]
    tolerance = 1e-3 if dtype == "float32" else 5e-2
    scale = max(1.0, float(np.max(np.abs(artifact_logits))))
    difference = float(np.max(np.abs(artifact_logits - model_logits)))
    if not difference <= tolerance * scale:
        directory = exported.directory
        raise ExportError(
            f"{directory}: the artifact ({directory / exported.metadata['artifact']['file']}) and "
            f"the variables ({directory / exported.metadata['variables']['dir']}) give different "
            f"logits for the same images (largest difference {difference:.3g}): they are not one "
            "model, so --explain would draw maps of another model than the one that answers. "
            "Run launch.py --mode export again")


def predict(args) -> int:
    import jax
    from PIL import Image
    from tqdm import tqdm

    from msff_jax.inference.export import load_export

    exported = load_export(Path(args.export_dir))
    files = collect_files(args.inputs)
    if args.max_image_pixels is not None:
        Image.MAX_IMAGE_PIXELS = args.max_image_pixels
    prep = exported.metadata["preprocessing"]
    names = exported.class_names
    k = min(args.top_k, len(names))
    # One padded batch shape for all batches: one compilation of the artifact.
    batch_shape = min(args.batch_size, len(files))
    infer = jax.jit(exported.__call__)
    explainer, explain_dir, used_names = None, None, set()
    if args.explain:
        from msff_jax.inference.explain import explainer_from_export

        explainer = explainer_from_export(Path(args.export_dir), exported.metadata)
        explain_dir = Path(args.explain)
        explain_dir.mkdir(parents=True, exist_ok=True)

    skipped: list[tuple[Path, str]] = []
    classified = 0
    with console.progress(total=len(files), unit="img", desc="predict") as progress:
        for batch_files in _batches(files, args.batch_size):
            images, good = [], []
            for path in batch_files:
                try:
                    kind = console.what_is(path)
                    if kind != "a file":  # Reading a FIFO or a device would block or never end.
                        raise ValueError(f"{kind or 'gone'}, not a regular file")
                    if path.stat().st_size == 0:
                        raise ValueError("empty file")
                    images.append(load_image(path, prep["image_size"], prep["crop_fraction"],
                                             args.max_file_mb * 2**20, prep["version"]))
                    good.append(path)
                except (ValueError, OSError) as err:  # load_image's reasons; OSError: unreadable
                    reason = skip_reason(path, err)
                    skipped.append((path, reason))
                    tqdm.write(f"skipped {path}: {reason}", file=sys.stderr)
            progress.update(len(batch_files))
            if not images:
                continue
            batch = np.stack(images)
            padded = np.concatenate(
                [batch, np.zeros((batch_shape - len(batch),) + batch.shape[1:], np.uint8)])
            logits, probabilities = infer(padded)
            probabilities = np.asarray(probabilities)[: len(batch)]
            explanations = explainer.explain(padded)[: len(batch)] if explainer else []
            if explainer and classified == 0:  # Before the first overlay is written.
                check_same_model(exported, np.asarray(logits)[: len(batch)],
                                 np.stack([e.logits for e in explanations]))
            for i, path in enumerate(good):
                predictions = top_predictions(probabilities[i], names, k)
                line = (format_json if args.json else format_text)(path, predictions)
                tqdm.write(line, file=sys.stdout)
                if explainer:
                    from msff_jax.inference.explain import save_explanation

                    explanation = explanations[i]
                    caption = (f"{path.name}: {names[explanation.predicted_class]} "
                               f"({100 * probabilities[i].max():.1f}%), {explanation.kind}")
                    save_explanation(_unique_png(explain_dir, path, used_names), batch[i],
                                     explanation, caption)
            classified += len(good)
    print(f"classified {classified} of {len(files)} files; skipped {len(skipped)}",
          file=sys.stderr)
    if classified == 0:
        return 1
    return 2 if skipped else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """argv without the program name; returns the exit status (0, 2: some files skipped,
    1: nothing classified or an error, named on one line)."""
    args = parse_args(argv)
    console.setup_logging(args.verbosity)

    def body() -> int:
        try:
            return predict(args)
        except ValueError as err:  # A bad export directory (ExportError) names its file.
            if isinstance(err, console.UserError):
                raise
            raise console.UserError(str(err)) from err

    return console.guarded(body, show_traceback=args.show_traceback)


def run() -> None:
    """Console entry point: `msff-predict`."""
    console.entry_point(main)


if __name__ == "__main__":
    run()
