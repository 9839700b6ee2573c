"""The catalogue converter: a folder made on the fly converts with one command and its
report agrees with what the script made; splits never cut a product; every bad input is
named; tables (CSV with a byte-order mark, JSON Lines) and a user's own split work."""

import collections
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from catalogue_data import CLASS_NAMES, make_catalogue, product_picture
from data_pipeline.conversion.catalogue import convert as catalogue
from data_pipeline.conversion.catalogue import perceptual_hash, splitting
from data_pipeline.conversion.catalogue.__main__ import main as catalogue_main
from data_pipeline.conversion.catalogue.layouts import CatalogueError, Columns
from data_pipeline.records import example_codec, manifest as manifest_lib
from record_helpers import read_records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(out) -> dict:
    """filename -> (split, decoded example), read back from the shards themselves."""
    manifest = manifest_lib.load_manifest(out)
    found = {}
    for split in manifest["splits"]:
        for path in manifest_lib.shard_paths(out, manifest, split):
            for record in read_records(path):
                example = example_codec.decode_example(record)
                found[example[example_codec.FILENAME]] = (split, example)
    return found


def _pixels(example) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(example[example_codec.IMAGE_ENCODED])).convert("RGB"), np.int16)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The script's catalogue, converted by one command (the module entry, as a user runs it)."""
    root = tmp_path_factory.mktemp("catalogue")
    truth = make_catalogue(root / "photos", seed=0)
    out = root / "shards"
    result = subprocess.run(
        [sys.executable, "-m", "data_pipeline.conversion.catalogue", f"--image_root={root / 'photos'}",
         f"--output_dir={out}", "--skip_bad"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"--config.data_dir={out} --config.num_classes=15" in result.stdout
    report = json.loads((out / "data_report.json").read_text())
    return truth, root / "photos", out, report, _records(out)


def test_report_and_shards_agree_with_the_script(converted):
    truth, _, out, report, records = converted
    manifest = manifest_lib.load_manifest(out)
    assert manifest["class_names"] == report["class_names"] == sorted(CLASS_NAMES)
    # Every usable image exactly once, under its own class; the broken ones nowhere.
    assert sorted(records) == sorted(truth.images)
    assert {path: ex[example_codec.CLASS_TEXT] for path, (_, ex) in records.items()} == truth.images
    per_class = {name: sum(report["splits"][s]["class_counts"][c] for s in splitting.SPLITS)
                 for c, name in enumerate(report["class_names"])}
    assert per_class == truth.class_counts()
    for split in splitting.SPLITS:
        assert manifest["splits"][split]["class_counts"] == report["splits"][split]["class_counts"]
        assert all(report["splits"][split]["class_counts"])  # every class in every split
    # Skipped: exactly the broken files, each with its reason; ignored: the others.
    assert {s["where"]: s["reason"] for s in report["skipped"]}.keys() == truth.broken.keys()
    for skip in report["skipped"]:
        assert truth.broken[skip["where"]] in skip["reason"]
    assert report["images"] == {"converted": len(truth.images), "skipped": len(truth.broken),
                                "ignored_files": len(truth.ignored)}
    assert sorted(report["ignored_files"]) == sorted(truth.ignored)
    assert manifest["source"]["num_skipped"] == len(truth.broken)
    # Duplicates: exactly the planted sets; the mislabelled copy is flagged.
    exact = [{f["path"] for f in s["files"]} for s in report["exact_duplicates"]]
    assert sorted(map(sorted, exact)) == sorted(map(sorted, truth.exact_duplicates))
    for s in report["exact_duplicates"]:
        assert len({records[f["path"]][0] for f in s["files"]}) == 1
        assert s["classes_differ"] == (len({truth.images[f["path"]] for f in s["files"]}) > 1)
    near = [{f["path"] for f in s["files"]} for s in report["near_duplicates"]["sets"]]
    assert sorted(map(sorted, near)) == sorted(sorted(pair) for pair in truth.near_duplicates)
    for s in report["near_duplicates"]["sets"]:  # the split shown is the split written
        assert all(records[f["path"]][0] == f["split"] for f in s["files"])
    # Image kinds as planted; the imbalance stated from the training counts.
    assert report["image_kinds"]["exif_rotated"] == len(truth.rotated)
    assert report["image_kinds"]["transparent"] == len(truth.transparent)
    assert set(report["image_kinds"]["formats"]) == {"JPEG", "PNG", "WEBP", "BMP"}
    train = dict(zip(report["class_names"], report["splits"]["train"]["class_counts"]))
    imbalance = report["class_imbalance"]
    assert imbalance["largest"] == {"class": max(train, key=train.get), "train_images": max(train.values())}
    assert imbalance["smallest"]["train_images"] == min(train.values())
    assert "imbalanced" in imbalance["statement"]
    markdown = (out / "data_report.md").read_text()
    for name in list(truth.broken) + [f"| {CLASS_NAMES[0]} |"]:
        assert name in markdown
    assert (out / "data_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_product_or_duplicate_is_cut_across_splits(converted):
    truth, _, _, report, records = converted
    by_group = collections.defaultdict(set)
    for path, group in truth.groups.items():
        if group is not None:
            by_group[group].add(records[path][0])
    assert len(by_group) > 20 and all(len(splits) == 1 for splits in by_group.values())
    for duplicates in truth.exact_duplicates:
        assert len({records[p][0] for p in duplicates}) == 1
    assert report["products"]["across_splits"] == 0
    counts = collections.Counter(split for split, _ in records.values())
    assert 0.65 < counts["train"] / len(records) < 0.85


def test_images_stored_upright_rgb_with_transparency_on_white(converted):
    truth, root, _, _, records = converted
    for path, upright in truth.rotated.items():
        _, example = records[path]
        assert (example[example_codec.IMAGE_HEIGHT], example[example_codec.IMAGE_WIDTH]) == upright.shape[:2]
        pixels = _pixels(example)
        assert pixels.shape == upright.shape
        assert np.abs(pixels - upright).mean() < 8  # the picture, not a sideways copy of it
    for path in truth.transparent:
        pixels = _pixels(records[path][1])
        assert pixels[: pixels.shape[0] // 4].mean() > 240  # the transparent band, on white
    # A plain RGB JPEG keeps its bytes; a grey JPEG too (decoders make it RGB).
    for path, (_, example) in records.items():
        if path.lower().endswith((".jpg", ".jpeg")) and path not in truth.rotated:
            assert example[example_codec.IMAGE_ENCODED] == (root / path).read_bytes()


def test_same_seed_same_shards_other_seed_other_split(converted, tmp_path):
    _, root, out, _, records = converted
    again = catalogue.convert(root, tmp_path / "again", skip_bad=True, num_workers=1, progress=False)[0]
    first = manifest_lib.load_manifest(out)
    assert again["splits"] == first["splits"]  # the same bytes, shard by shard
    other, _ = catalogue.convert(root, tmp_path / "seed1", seed=1, skip_bad=True, num_workers=1, progress=False)
    assert {p: s for p, (s, _) in _records(tmp_path / "seed1").items()} != {p: s for p, (s, _) in records.items()}
    assert sum(other["splits"][s]["num_examples"] for s in splitting.SPLITS) == len(records)


def test_group_near_duplicates_keeps_each_set_in_one_split(converted, tmp_path):
    truth, root, _, _, _ = converted
    _, report = catalogue.convert(root, tmp_path / "grouped", skip_bad=True, group_near_duplicates=True,
                                  num_workers=1, progress=False)
    assert len(report["near_duplicates"]["sets"]) == len(truth.near_duplicates)
    for near_set in report["near_duplicates"]["sets"]:
        assert not near_set["splits_differ"]


def test_broken_file_stops_the_run_naming_it(converted, tmp_path, capsys):
    truth, root, _, _, _ = converted
    status = catalogue_main([f"--image_root={root}", f"--output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert status == 1 and err.count("\n") == 0
    first = sorted(truth.broken)[0]
    assert err.startswith(f"error: {first}: {truth.broken[first]}") and "2 more" in err and "--skip_bad" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


# ----------------------------------------------------------------- the split, in general


def test_grouped_split_never_cuts_a_group_and_stratifies():
    rng = np.random.default_rng(0)
    for seed in range(20):
        num_classes = int(rng.integers(2, 8))
        labels, units = [], []
        # Three products of every class at least, then products of random classes and sizes.
        classes = list(range(num_classes)) * 3 + rng.integers(num_classes, size=int(rng.integers(0, 40))).tolist()
        for label in classes:
            size = int(rng.integers(1, 6))
            units.append(list(range(len(labels), len(labels) + size)))
            labels += [int(label)] * size
        names = [f"c{i}" for i in range(num_classes)]
        assert splitting.too_small_classes(labels, units, num_classes) == {}
        splits = splitting.assign_splits(labels, units, names, (0.8, 0.1, 0.1), seed)
        assert all(len({splits[i] for i in unit}) == 1 for unit in units)
        assert splits == splitting.assign_splits(labels, units, names, (0.8, 0.1, 0.1), seed)
        for c in range(num_classes):
            assert {splits[i] for i in range(len(labels)) if labels[i] == c} == set(splitting.SPLITS)
    # A class in two products cannot be in three splits.
    assert splitting.too_small_classes([0, 0, 0, 1, 1], [[0], [1], [2], [3], [4]], 2) == {1: 2}
    with pytest.raises(splitting.SplitError, match="class 'b' could not be given a product"):
        splitting.assign_splits([0, 0, 0, 1, 1], [[0], [1], [2], [3], [4]], ["a", "b"], (0.8, 0.1, 0.1), 0)


def test_split_fractions_at_scale():
    labels = [i % 5 for i in range(5000)]
    units = [list(range(i, min(i + 5, 5000))) for i in range(0, 5000, 5)]  # mixed-class products
    splits = splitting.assign_splits(labels, units, list("abcde"), splitting.parse_fractions("7:2:1"), 3)
    counts = collections.Counter(splits)
    assert abs(counts["train"] - 3500) <= 10 and abs(counts["val"] - 1000) <= 10
    with pytest.raises(splitting.SplitError, match="three positive"):
        splitting.parse_fractions("8:2")


def test_perceptual_hash_finds_copies_and_close_pairs_matches_brute_force():
    rng = np.random.default_rng(1)
    pictures = [product_picture(rng, (96, 80)) for _ in range(30)]
    hashes = [perceptual_hash.dct_hash(p) for p in pictures]
    buffer = io.BytesIO()
    pictures[0].resize((60, 50), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=60)
    copy = perceptual_hash.dct_hash(Image.open(buffer))
    assert perceptual_hash.hamming(copy, hashes[0]) <= 4
    distinct = [perceptual_hash.hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    assert min(distinct) > catalogue.DEFAULT_NEAR_DUPLICATE_BITS
    random_hashes = [int(h) for h in rng.integers(0, 2**63, 300, dtype=np.int64)]
    random_hashes += [h ^ (1 << int(b)) for h, b in zip(random_hashes[:40], rng.integers(0, 64, 40))]
    for bits in (0, 3, 9):
        brute = [(i, j, perceptual_hash.hamming(a, b)) for i, a in enumerate(random_hashes)
                 for j, b in enumerate(random_hashes) if i < j and perceptual_hash.hamming(a, b) <= bits]
        assert perceptual_hash.close_pairs(random_hashes, bits) == brute


# ------------------------------------------------------------------------- bad input


def _photo(path, seed: int, fmt: str = "JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    product_picture(np.random.default_rng(seed), (40, 40)).save(path, fmt)


def _three_classes(root, per_class: int = 4):
    for c, name in enumerate(("cap", "mug", "tee")):
        for i in range(per_class):
            _photo(os.path.join(root, name, f"{i}.jpg"), 100 * c + i)


def _convert(root, out, **options):
    return catalogue.convert(root, out, **{"num_workers": 1, "progress": False, **options})


@pytest.mark.parametrize("damage, named, reason", [
    ("truncated", "mug/1.jpg", "not a readable image"),
    ("not_an_image", "mug/1.jpg", "not an image"),
    ("empty_class", "class 'vase'", "has no usable images"),
    ("small_class", "class 'mug'", "has 2 images in 2 product(s)"),
    ("loose_image", "loose.jpg", "image outside any class folder"),
    ("unknown_class", "hat/", "class folder 'hat' is not one of --classes"),
])
def test_each_bad_folder_input_is_named_and_skippable(tmp_path, damage, named, reason):
    root = tmp_path / "photos"
    _three_classes(root)
    options = {}
    if damage == "truncated":
        data = (root / "mug" / "1.jpg").read_bytes()
        (root / "mug" / "1.jpg").write_bytes(data[: len(data) // 2])
    elif damage == "not_an_image":
        (root / "mug" / "1.jpg").write_text("hello")
    elif damage == "empty_class":
        (root / "vase").mkdir()
        (root / "vase" / "readme.txt").write_text("photos to come")
    elif damage == "small_class":
        (root / "mug" / "2.jpg").unlink()
        (root / "mug" / "3.jpg").unlink()
    elif damage == "loose_image":
        _photo(str(root / "loose.jpg"), 7)
    elif damage == "unknown_class":
        _photo(str(root / "hat" / "0.jpg"), 8)
        options["classes"] = ["cap", "mug", "tee"]
    with pytest.raises(CatalogueError, match="^" + re.escape(f"{named}: {reason}")):
        _convert(root, tmp_path / "out", **options)
    assert not (tmp_path / "out" / "manifest.json").exists()
    manifest, report = _convert(root, tmp_path / "out", skip_bad=True, **options)
    assert [(s["where"], s["reason"].startswith(reason)) for s in report["skipped"]] == [(named, True)]
    assert manifest["source"]["skipped"][0]["image"] == named
    if damage in ("empty_class", "small_class"):
        assert named.split("'")[1] not in manifest["class_names"]


def test_output_and_layout_mistakes(tmp_path, capsys):
    root = tmp_path / "photos"
    _three_classes(root)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CatalogueError, match="is a file"):
        _convert(root, tmp_path / "a_file")
    with pytest.raises(CatalogueError, match="inside --image_root"):
        _convert(root, root / "shards")
    _photo(str(root / "train" / "cap" / "0.jpg"), 1)
    with pytest.raises(CatalogueError, match=r"split folders \(train\) beside other folders"):
        _convert(root, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        _convert(tmp_path / "nowhere", tmp_path / "out")
    # The command line: one error line, exit 1; a misused flag, exit 2.
    assert catalogue_main([f"--image_root={root}", f"--output_dir={tmp_path / 'a_file'}"]) == 1
    assert capsys.readouterr().err.startswith(f"error: --output_dir {tmp_path / 'a_file'} is a file")
    assert catalogue_main([f"--image_root={root}", f"--output_dir={tmp_path / 'o'}", "--group_column=sku"]) == 1
    assert "--group_column only applies with --table" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        catalogue_main([f"--image_root={root}"])
    assert exit_info.value.code == 2 and "--output_dir is required" in capsys.readouterr().err


# ---------------------------------------------------------------------------- tables


def _table_catalogue(root):
    """Nine products of three views in three classes, under one folder."""
    rows = []
    for c, name in enumerate(("cap", "mug", "tee")):
        for product in range(3):
            for view in range(3):
                relative = f"img/{name}-{product}-{view}.{('jpg', 'png', 'webp')[view]}"
                _photo(str(root / relative), 100 * c + 10 * product + view, ("JPEG", "PNG", "WEBP")[view])
                rows.append({"file": relative, "category": name, "sku": f"{name}{product}"})
    return rows


def test_csv_with_byte_order_mark_groups_by_sku(tmp_path):
    root = tmp_path / "photos"
    rows = _table_catalogue(root)
    table = tmp_path / "catalogue.csv"
    lines = ["file,category,sku"] + [f"{r['file']},{r['category']},{r['sku']}" for r in rows]
    table.write_text("\ufeff" + "\r\n".join(lines) + "\r\n", encoding="utf-8")
    columns = Columns(path="file", label="category", group="sku")
    manifest, report = _convert(root, tmp_path / "out", table=table, columns=columns)
    assert manifest["class_names"] == ["cap", "mug", "tee"]
    records = _records(tmp_path / "out")
    by_sku = collections.defaultdict(set)
    for r in rows:
        by_sku[r["sku"]].add(records[r["file"]][0])
    assert all(len(s) == 1 for s in by_sku.values())
    assert report["products"] == {"grouped_by": "the 'sku' column", "count": 9, "with_several_images": 9,
                                  "largest": 3, "across_splits": 0}
    with pytest.raises(CatalogueError, match=r"catalogue.csv: no column 'path' and no column 'label'; its columns are 'file', 'category', 'sku'"):
        _convert(root, tmp_path / "out2", table=table)


@pytest.mark.parametrize("row, named, reason", [
    ({"path": "img/missing.jpg", "label": "cap", "split": "train"}, "line 11 (img/missing.jpg)", "file missing"),
    ({"path": "../outside.jpg", "label": "cap", "split": "train"}, "line 11 (../outside.jpg)",
     "the path leaves the image root"),
    ({"path": "/etc/hosts", "label": "cap", "split": "train"}, "line 11 (/etc/hosts)", "the path leaves"),
    ({"path": "img/cap-0-0.jpg", "label": "cap", "split": "train"}, "line 11 (img/cap-0-0.jpg)",
     "the same file again (first at line"),
    ({"path": "img/extra.jpg", "label": "vase", "split": "train"}, "line 11 (img/extra.jpg)",
     "label 'vase' is not one of --classes"),
    ({"path": "img/extra.jpg", "label": "", "split": "train"}, "line 11", "no value in column 'label'"),
    ({"path": "img/extra.jpg", "label": "cap", "split": "holdout"}, "line 11", "split 'holdout' is not"),
    ("{not json", "line 11", "not valid JSON"),
])
def test_json_lines_with_a_split_column_names_each_bad_row(tmp_path, row, named, reason):
    root = tmp_path / "photos"
    rows = _table_catalogue(root)
    _photo(str(root / "img" / "extra.jpg"), 999)
    table = tmp_path / "catalogue.jsonl"
    # The user's split: product 0 of each class to train, 1 to val, 2 to test.
    good = [{"path": r["file"], "label": r["category"],
             "split": ("train", "validation", "test")[int(r["file"].split("-")[1])]} for r in rows]
    lines = [json.dumps(r) for r in good]
    lines.insert(10, row if isinstance(row, str) else json.dumps(row))  # becomes line 11
    table.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # a byte-order mark here too
    options = dict(table=table, columns=Columns(split="split"), classes=["cap", "mug", "tee"])
    with pytest.raises(CatalogueError, match="^" + re.escape(f"catalogue.jsonl {named}: {reason}")):
        _convert(root, tmp_path / "out", **options)
    manifest, report = _convert(root, tmp_path / "out", skip_bad=True, **options)
    assert [s["where"] for s in report["skipped"]] == [f"catalogue.jsonl {named}"]
    records = _records(tmp_path / "out")
    assert {p: s for p, (s, _) in records.items()} == {r["path"]: r["split"].replace("validation", "val")
                                                        for r in good}


def test_user_split_folders_kept_and_a_copy_across_splits_caught(tmp_path):
    root = tmp_path / "photos"
    seed = 0
    for split, count in (("train", 4), ("val", 2), ("test", 2)):
        for name in ("cap", "mug"):
            for i in range(count):
                seed += 1
                _photo(str(root / split / name / f"{i}.png"), seed, "PNG")
    shutil.copyfile(root / "train" / "mug" / "0.png", root / "test" / "mug" / "copy.png")
    _photo(str(root / "train" / "cap" / "sku9" / "front.png"), 90, "PNG")  # one product in two splits
    _photo(str(root / "test" / "cap" / "sku9" / "back.png"), 91, "PNG")
    with pytest.raises(CatalogueError, match=r"^test/mug/copy.png: the same bytes as train/mug/0.png in train"):
        _convert(root, tmp_path / "out")
    manifest, report = _convert(root, tmp_path / "out", skip_bad=True)
    assert report["layout"] == "split folders" and report["split"] == "as given by the user"
    assert [s["kind"] for s in report["skipped"]] == ["duplicate across splits"]
    records = _records(tmp_path / "out")
    assert all(path.startswith(split + "/") for path, (split, _) in records.items())
    assert manifest["splits"]["train"]["class_counts"] == [5, 4]
    assert report["products"]["across_splits"] == 1
    assert any(w.startswith("1 product(s) (a product folder") for w in report["warnings"])


def test_linked_class_folder_is_read_and_a_second_link_listed(tmp_path):
    root = tmp_path / "photos"
    _three_classes(root)
    elsewhere = tmp_path / "more_pots"
    for i in range(4):
        _photo(str(elsewhere / f"{i}.jpg"), 50 + i)
    os.symlink(elsewhere, root / "pot")
    os.symlink(elsewhere, root / "tee" / "same_pots")  # the same folder again, inside another class
    manifest, report = _convert(root, tmp_path / "out")
    assert manifest["class_names"] == ["cap", "mug", "pot", "tee"]
    assert sum(manifest["splits"][s]["class_counts"][2] for s in splitting.SPLITS) == 4
    assert report["ignored_files"] == ["tee/same_pots/"]


@pytest.mark.parametrize("name, content, message", [
    ("catalogue.csv", "path,label\nimg/caf\xe9.jpg,cap\n".encode("latin-1"), "catalogue.csv: line 2 is not UTF-8 text"),
    ("catalogue.json", b'[{"path": "a.jpg", "label": "cap"}]\n', "holds a JSON array; write one JSON object"),
    ("catalogue.xlsx", b"PK\x03\x04", "unknown table type '.xlsx'"),
])
def test_a_table_that_cannot_be_read_stops_the_run(tmp_path, name, content, message):
    (tmp_path / "photos").mkdir()
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CatalogueError, match=re.escape(message)):
        _convert(tmp_path / "photos", tmp_path / "out", table=tmp_path / name, skip_bad=True)


def test_a_missing_file_is_one_kind_whichever_step_finds_it(tmp_path):
    """A table's missing row is found when listing, a folder's dangling link when reading:
    the report counts both under one kind, in the words the error message uses."""
    root = tmp_path / "photos"
    _three_classes(root)
    os.symlink(tmp_path / "gone.jpg", root / "cap" / "gone.jpg")
    _, folders = _convert(root, tmp_path / "folders", skip_bad=True)
    table = tmp_path / "catalogue.csv"
    table.write_text("path,label\n" + "".join(f"{name}/{i}.jpg,{name}\n" for name in ("cap", "mug", "tee")
                                              for i in range(4)) + "cap/gone.jpg,cap\n")
    _, listed = _convert(root, tmp_path / "table", table=table, skip_bad=True)
    assert folders["skipped_by_kind"] == listed["skipped_by_kind"] == {"missing file": 1}


def test_a_folder_that_cannot_be_listed_is_named_not_passed_over(tmp_path, monkeypatch):
    """os.walk passes over a folder it cannot list; its class would vanish without a word.
    (The tests run as root, whom permissions do not stop, so listing is made to fail.)"""
    root = tmp_path / "photos"
    _three_classes(root)
    listing = os.scandir

    def scandir(path="."):
        if os.fspath(path) == os.fspath(root / "mug"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return listing(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(CatalogueError, match=r"^mug/: cannot list the folder \(Permission denied\); fix it"):
        _convert(root, tmp_path / "out")
    manifest, report = _convert(root, tmp_path / "out", skip_bad=True)
    assert manifest["class_names"] == ["cap", "tee"]
    assert report["skipped_by_kind"] == {"unreadable folder": 1}


def test_imbalance_statement_of_equal_classes_names_no_class_twice(tmp_path):
    _three_classes(tmp_path / "photos")
    _, report = _convert(tmp_path / "photos", tmp_path / "out")
    assert report["class_imbalance"]["statement"] == ("Every class has 2 training images. That is close to "
                                                      "balanced.")


def test_near_duplicates_are_sought_among_distinct_files_only(monkeypatch):
    """A placeholder picture repeated n times is one file for the perceptual search (its
    copies are exact duplicates), not n^2/2 pairs; the sets found stay the same."""
    from data_pipeline.conversion.catalogue import duplicates

    searched = []
    close_pairs = perceptual_hash.close_pairs
    monkeypatch.setattr(perceptual_hash, "close_pairs",
                        lambda hashes, bits: searched.append(len(hashes)) or close_pairs(hashes, bits))
    placeholder, photo, resized, other = 0x0F0F0F0F0F0F0F0F, 0x123456789ABCDEF0, 0x123456789ABCDEF1, 0xFFFF0000FFFF0000
    sha256s = ["p"] * 50 + ["a", "b", "c"]
    hashes = [placeholder] * 50 + [photo, resized, other]
    sets = duplicates.near_duplicate_sets(sha256s, hashes, 6)
    assert searched == [4]
    assert sets == [duplicates.NearDuplicateSet((50, 51), 1)]
    # A resized copy of the placeholder joins the set with every copy of it.
    sets = duplicates.near_duplicate_sets(sha256s + ["q"], hashes + [placeholder ^ 3], 6)
    assert sets[0] == duplicates.NearDuplicateSet(tuple(range(50)) + (53,), 2)
