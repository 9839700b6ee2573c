"""End-to-end conversion of a synthetic DeepFashion, bad images, and crash-safe reruns."""

import collections
import hashlib
import io
import json
import shutil

import pytest
from PIL import Image

from data_pipeline.conversion import deepfashion
from data_pipeline.records import example_codec
from data_pipeline.conversion import selection
from data_pipeline.conversion import shard_writer
from data_pipeline.conversion import synthetic
from record_helpers import read_records

FOUR = ["Dress", "Tee", "Blouse", "Shorts"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("deepfashion"), 240, seed=0)


@pytest.fixture
def dataset_copy(dataset, tmp_path):
    return shutil.copytree(dataset, tmp_path / "deepfashion")


def _records(output_dir, manifest, split):
    for shard in manifest["splits"][split]["shards"]:
        for record in read_records(output_dir / shard["file"]):
            yield shard["file"], example_codec.decode_example(record)


def _convert(root, out, **options):
    defaults = dict(categories=FOUR, max_images=0, sampling="proportional", num_workers=1, progress=False)
    return deepfashion.convert(root, out, **{**defaults, **options})


def _listed_line(root, relative_path):
    lines = (root / "Anno" / "list_category_img.txt").read_text().splitlines()
    return next(i for i, line in enumerate(lines, start=1) if line.split()[0] == relative_path)


def _paths_of(root, category):
    label = [n for n, _ in synthetic.CATEGORIES].index(category) + 1
    rows = (root / "Anno" / "list_category_img.txt").read_text().splitlines()[2:]
    return [r.split()[0] for r in rows if int(r.split()[1]) == label]


def test_default_conversion_matches_manifest_and_source(dataset, tmp_path):
    out = tmp_path / "shards"
    manifest = deepfashion.convert(dataset, out, max_images=105, seed=1, shard_size_mb=0.3, num_workers=1, progress=False)
    assert manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["class_names"] == list(synthetic.DEFAULT_15)
    assert manifest["image_format"] == "jpeg" and manifest["format_version"] == 1
    assert manifest["source"]["args"]["max_images"] == 105 and manifest["source"]["num_skipped"] == 0
    totals = collections.Counter()
    folders = collections.defaultdict(set)
    for split, info in manifest["splits"].items():
        assert info["num_examples"] == sum(info["class_counts"]) == sum(s["num_records"] for s in info["shards"])
        counts = [0] * 15
        for shard in info["shards"]:
            assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
            assert shard["file"].startswith(f"{split}-") and shard["file"].endswith(f"-of-{len(info['shards']):05d}.tfrecord")
        for _, example in _records(out, manifest, split):
            label = example["image/class/label"]
            assert manifest["class_names"][label] == example["image/class/text"]
            relative = example["image/filename"]
            assert f"_{example['image/class/text']}/" in relative  # synthetic folders end in their category
            original = (dataset / "Img" / relative).read_bytes()
            assert example["image/encoded"] == original  # original JPEG bytes, untouched
            assert Image.open(io.BytesIO(original)).size == (example["image/width"], example["image/height"])
            counts[label] += 1
            folders[selection.product_folder(relative)].add(split)
        assert counts == info["class_counts"]
        totals.update({label: c for label, c in enumerate(counts)})
    assert sum(totals.values()) == 105 and set(totals.values()) == {7}  # class-balanced
    assert all(len(splits) == 1 for splits in folders.values())  # no product in two splits
    assert len(manifest["splits"]["train"]["shards"]) > 1


def test_worker_pool_writes_identical_shards(dataset, tmp_path):
    one = _convert(dataset, tmp_path / "one", shard_size_mb=0.2)
    two = _convert(dataset, tmp_path / "two", shard_size_mb=0.2, num_workers=2)
    assert one["splits"] == two["splits"]


def test_crop_and_resize_reencode(dataset, tmp_path):
    manifest = _convert(dataset, tmp_path / "out", categories=["Skirt", "Tank"], crop_to_bbox=True, bbox_margin=0.1, resize_to=64)
    boxes = {line.split()[0]: [int(v) for v in line.split()[1:]]
             for line in (dataset / "Anno" / "list_bbox.txt").read_text().splitlines()[2:]}
    seen = 0
    for _, example in _records(tmp_path / "out", manifest, "train"):
        image = Image.open(io.BytesIO(example["image/encoded"]))
        assert image.format == "JPEG" and image.size == (example["image/width"], example["image/height"])
        assert max(image.size) == 64
        x1, y1, x2, y2 = boxes[example["image/filename"]]
        assert abs(image.width / image.height - (x2 - x1) / (y2 - y1)) < 0.35  # the box's shape, not the photo's
        seen += 1
    assert seen > 0


@pytest.mark.parametrize("damage, problem", [
    ("missing", "image file missing"),
    ("truncated", "not a readable image"),
    ("not_an_image", "not a readable image"),
])
def test_bad_image_is_an_error_naming_file_and_line(dataset_copy, tmp_path, damage, problem):
    victim = _paths_of(dataset_copy, "Tee")[1]
    path = dataset_copy / "Img" / victim
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_text("<html>404 Not Found</html>")
    line = _listed_line(dataset_copy, victim)
    with pytest.raises(shard_writer.BadImageError, match=rf"{victim} \(Anno/list_category_img.txt:{line}\): {problem}"):
        _convert(dataset_copy, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_skip_policy_counts_and_records_every_skip(dataset_copy, dataset, tmp_path):
    clean = _convert(dataset, tmp_path / "clean")
    victims = _paths_of(dataset_copy, "Dress")[:2] + _paths_of(dataset_copy, "Shorts")[:1]
    (dataset_copy / "Img" / victims[0]).unlink()
    (dataset_copy / "Img" / victims[1]).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (dataset_copy / "Img" / victims[2]).write_bytes(b"GIF89a nonsense")
    manifest = _convert(dataset_copy, tmp_path / "out", on_bad_image="skip")
    skipped = manifest["source"]["skipped"]
    assert manifest["source"]["num_skipped"] == 3
    assert sorted(s["image"].split()[0] for s in skipped) == sorted(victims)
    assert all("Anno/list_category_img.txt:" in s["image"] for s in skipped)
    total = lambda m: [sum(s["class_counts"][c] for s in m["splits"].values()) for c in range(4)]
    assert total(manifest) == [a - b for a, b in zip(total(clean), [2, 0, 0, 1])]
    written = {e["image/filename"] for split in manifest["splits"] for _, e in _records(tmp_path / "out", manifest, split)}
    assert not written & set(victims)


class _Crash(Exception):
    pass


def test_killed_run_leaves_nothing_that_looks_complete_and_rerun_finishes(dataset, tmp_path, monkeypatch):
    out = tmp_path / "out"
    options = dict(seed=5, shard_size_mb=0.1)
    reference = _convert(dataset, tmp_path / "reference", **options)
    _convert(dataset, out, seed=9)  # an older, complete conversion in the same folder
    calls = {"n": 0}
    real_encode = deepfashion.encode_image_task

    def crashing_encode(task):
        calls["n"] += 1
        if calls["n"] == 25:
            raise _Crash("killed")
        return real_encode(task)

    monkeypatch.setattr(deepfashion, "encode_image_task", crashing_encode)
    with pytest.raises(_Crash):
        _convert(dataset, out, **options)
    assert not (out / "manifest.json").exists()  # the old manifest is gone, none written
    finished = sorted(p.name for p in out.glob("*.tfrecord"))
    assert finished and any(p.name.endswith(".partial") for p in out.iterdir())
    for name in finished:  # every file with a final name is a complete, valid shard
        list(read_records(out / name))
    mtimes = {name: (out / name).stat().st_mtime_ns for name in finished}

    calls["n"] = -10**9  # no more crashes; count encodes of the rerun
    manifest = _convert(dataset, out, **options)
    assert manifest["splits"] == reference["splits"]
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == mtimes  # reused, not rewritten
    total = sum(s["num_examples"] for s in reference["splits"].values())
    assert calls["n"] + 10**9 == total - sum(s["num_records"] for split in reference["splits"].values()
                                              for s in split["shards"] if s["file"] in finished)
    assert not any(p.name.endswith(".partial") for p in out.iterdir())
    assert sorted(p.name for p in out.glob("*.tfrecord")) == sorted(
        s["file"] for split in reference["splits"].values() for s in split["shards"])


def test_shard_whose_checksum_changed_is_rewritten_on_rerun(dataset, tmp_path):
    out = tmp_path / "out"
    first = _convert(dataset, out, shard_size_mb=0.1)
    victim = out / first["splits"]["train"]["shards"][0]["file"]
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    again = _convert(dataset, out, shard_size_mb=0.1)
    assert again["splits"] == first["splits"]
    list(read_records(victim))


def test_command_line_reports_errors_and_success(dataset, tmp_path, capsys):
    assert deepfashion.main(["--deepfashion_dir", str(dataset), "--output_dir", str(tmp_path / "a"),
                             "--categories", "Dress,Cape"]) == 1
    assert "'Cape' has no images" in capsys.readouterr().err
    assert deepfashion.main(["--deepfashion_dir", str(dataset), "--output_dir", str(tmp_path / "b"),
                             "--max_images", "50000"]) == 1
    assert "--sampling proportional" in capsys.readouterr().err
    assert deepfashion.main(["--deepfashion_dir", str(dataset), "--output_dir", str(tmp_path / "c"),
                             "--categories", "Jeans,Leggings", "--max_images", "10", "--split", "official",
                             "--num_workers", "1"]) == 0
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["class_names"] == ["Jeans", "Leggings"]
    assert sum(s["num_examples"] for s in manifest["splits"].values()) == 10
    assert manifest["source"]["args"]["split"] == "official"


def test_tfds_builder_builds_the_same_selection(dataset, tmp_path):
    import tensorflow_datasets as tfds

    from data_pipeline.conversion.deepfashion15 import Builder

    builder = Builder(config="balanced_all", data_dir=str(tmp_path / "tfds"))
    assert builder.info.features["label"].names == list(synthetic.DEFAULT_15)
    assert "manual_dir" in Builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(dataset)))
    manifest = _convert(dataset, tmp_path / "shards", categories=None, sampling="balanced", max_images=0, seed=0)
    for split, tfds_split in (("train", "train"), ("val", "validation"), ("test", "test")):
        ours = {(e["image/filename"], e["image/class/label"]) for _, e in _records(tmp_path / "shards", manifest, split)}
        theirs = {(ex["filename"].decode(), int(ex["label"]))
                  for ex in tfds.as_numpy(builder.as_dataset(split=tfds_split))}
        assert theirs == ours and ours


def test_an_output_dir_that_is_a_file_is_named_as_one(dataset, tmp_path, capsys):
    from data_pipeline.conversion import digits as digits_converter

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for program, argv in ((deepfashion, ["--deepfashion_dir", str(dataset), "--categories",
                                         "Jeans,Leggings", "--max_images", "10", "--split",
                                         "official", "--num_workers", "1"]),
                          (digits_converter, [])):
        assert program.main(argv + ["--output_dir", str(a_file)]) == 1
        err = capsys.readouterr().err
        assert err == f"error: {a_file} is a file, where a folder is needed; move it away or pass another path\n"
    assert a_file.read_text() == "x"


def test_a_list_file_that_starts_with_a_byte_order_mark_converts(dataset, tmp_path):
    """Some editors save UTF-8 with a BOM; it is not part of line 1's entry count."""
    copy = shutil.copytree(dataset, tmp_path / "bom")
    for name in ("Anno/list_category_img.txt", "Anno/list_category_cloth.txt",
                 "Eval/list_eval_partition.txt"):
        path = copy / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    converted = _convert(copy, tmp_path / "out", categories=["Jeans", "Leggings"], max_images=10,
                         split="official")
    plain = _convert(dataset, tmp_path / "plain", categories=["Jeans", "Leggings"], max_images=10,
                     split="official")
    assert converted["splits"] == plain["splits"]
