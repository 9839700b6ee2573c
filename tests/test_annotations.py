"""List-file parsing and image selection: the real format, and every bad input named."""

import collections

import numpy as np
import pytest

from data_pipeline.conversion import annotations
from data_pipeline.conversion import selection
from data_pipeline.conversion import synthetic

CLOTH = "50\ncategory_name  category_type\n" + "".join(f"{n:<28}{t}\n" for n, t in synthetic.CATEGORIES)


def _write_root(tmp_path, rows, *, anno="Anno", cloth=CLOTH, partition=None, bbox=None):
    """A dataset folder with the given `(path, label)` rows (no images needed here)."""
    (tmp_path / anno).mkdir(parents=True, exist_ok=True)
    (tmp_path / anno / "list_category_cloth.txt").write_text(cloth)
    body = "".join(f"{p:<60}{label}\n" for p, label in rows)
    (tmp_path / anno / "list_category_img.txt").write_text(f"{len(rows)}\nimage_name  category_label\n{body}")
    if partition is not None:
        (tmp_path / "Eval").mkdir(exist_ok=True)
        body = "".join(f"{p:<60}{v}\n" for p, v in partition)
        (tmp_path / "Eval" / "list_eval_partition.txt").write_text(f"{len(partition)}\nimage_name  evaluation_status\n{body}")
    if bbox is not None:
        body = "".join(f"{p:<60}{' '.join(map(str, b))}\n" for p, b in bbox)
        (tmp_path / anno / "list_bbox.txt").write_text(f"{len(bbox)}\nimage_name  x_1  y_1  x_2  y_2\n{body}")
    return tmp_path


def _label(name):
    return [n for n, _ in synthetic.CATEGORIES].index(name) + 1


def test_parses_padded_real_format_and_anno_coarse(tmp_path):
    rows = [("img/Sheer_Pleated-Front_Blouse/img_00000001.jpg", 3), ("img/Knit_Tee/img_00000001.jpg", 18)]
    root = _write_root(tmp_path, rows, anno="Anno_coarse", partition=[(rows[0][0], "train"), (rows[1][0], "val")],
                       bbox=[(rows[0][0], ("072", "079", "232", "273")), (rows[1][0], (1, 2, 3, 4))])
    loaded = annotations.load_annotations(root, need_partition=True, need_bboxes=True)
    assert loaded.annotation_dir == "Anno_coarse"
    assert loaded.categories[0] == annotations.Category("Anorak", 1)
    assert loaded.categories[-1] == annotations.Category("Sundress", 3)
    assert [(i.path, i.category) for i in loaded.images] == [(rows[0][0], 2), (rows[1][0], 17)]
    assert str(loaded.images[1].source) == "Anno_coarse/list_category_img.txt:4"
    assert loaded.partition[rows[1][0]][0] == "val"
    box = loaded.bboxes[rows[0][0]]
    assert (box.x1, box.y1, box.x2, box.y2) == (72, 79, 232, 273)


@pytest.mark.parametrize("label", [0, 51, -3])
def test_label_outside_1_to_50_names_file_and_line(tmp_path, label):
    root = _write_root(tmp_path, [("img/A_Tee/img_00000001.jpg", 18), ("img/B_Tee/img_00000001.jpg", label)])
    with pytest.raises(annotations.AnnotationError, match=rf"Anno/list_category_img.txt:4: label {label} outside 1..50"):
        annotations.load_annotations(root)


def test_wrong_column_count_names_file_and_line(tmp_path):
    root = _write_root(tmp_path, [("img/A_Tee/img_00000001.jpg", 18)])
    path = root / "Anno" / "list_category_img.txt"
    path.write_text("2\nimage_name  category_label\nimg/A_Tee/img_00000001.jpg  18\nimg/B Tee/img_00000001.jpg  18\n")
    with pytest.raises(annotations.AnnotationError, match=r"list_category_img.txt:4: expected 2 columns, found 3"):
        annotations.load_annotations(root)


def test_count_on_line_1_disagreeing_with_rows(tmp_path):
    root = _write_root(tmp_path, [("img/A_Tee/img_00000001.jpg", 18)])
    path = root / "Anno" / "list_category_img.txt"
    path.write_text(path.read_text().replace("1\n", "3\n", 1))
    with pytest.raises(annotations.AnnotationError, match=r"list_category_img.txt:1: line 1 declares 3 entries but the file has 1 rows"):
        annotations.load_annotations(root)
    path.write_text("many\nimage_name  category_label\n")
    with pytest.raises(annotations.AnnotationError, match=r":1: expected the number of entries"):
        annotations.load_annotations(root)


@pytest.mark.parametrize("bad_path, why", [
    ("img/../../etc/passwd", r"escapes the dataset folder"),
    ("../img/A_Tee/img_00000001.jpg", r"escapes the dataset folder"),
    ("/etc/passwd", r"absolute path"),
    ("C:/data/img_00000001.jpg", r"absolute path"),
])
def test_path_escaping_the_dataset_folder(tmp_path, bad_path, why):
    root = _write_root(tmp_path, [("img/A_Tee/img_00000001.jpg", 18), (bad_path, 18)])
    with pytest.raises(annotations.AnnotationError, match=rf"list_category_img.txt:4: .*{why}"):
        annotations.load_annotations(root)


def test_duplicate_path_unknown_partition_and_bad_box(tmp_path):
    rows = [("img/A_Tee/img_00000001.jpg", 18), ("img/A_Tee/img_00000001.jpg", 18)]
    with pytest.raises(annotations.AnnotationError, match=r":4: img/A_Tee/img_00000001.jpg already listed on line 3"):
        annotations.load_annotations(_write_root(tmp_path / "a", rows))
    rows = rows[:1]
    root = _write_root(tmp_path / "b", rows, partition=[(rows[0][0], "validation")])
    with pytest.raises(annotations.AnnotationError, match=r"list_eval_partition.txt:3: partition must be one of"):
        annotations.load_annotations(root, need_partition=True)
    annotations.load_annotations(root)  # the partition is not read unless needed
    root = _write_root(tmp_path / "c", rows, bbox=[(rows[0][0], (50, 10, 40, 90))])
    with pytest.raises(annotations.AnnotationError, match=r"list_bbox.txt:3: bounding box .* empty"):
        annotations.load_annotations(root, need_bboxes=True)


def test_category_file_must_hold_50_typed_categories(tmp_path):
    cloth = CLOTH.replace("Anorak                      1", "Anorak                      4")
    with pytest.raises(annotations.AnnotationError, match=r"list_category_cloth.txt:3: category type must be 1, 2 or 3"):
        annotations.load_annotations(_write_root(tmp_path / "a", [], cloth=cloth))
    with pytest.raises(annotations.AnnotationError, match=r"no Anno/list_category_img.txt"):
        annotations.load_annotations(tmp_path / "missing")


# ----------------------------------------------------------------------------- selection


def _counts_root(tmp_path, counts, folder_size=3, partition=False):
    rows = []
    for name, count in counts.items():
        for i in range(count):
            rows.append((f"img/Product{i // folder_size}_{name}/img_{i % folder_size + 1:08d}.jpg", _label(name)))
    parts = [(p, ("train", "val", "test")[i % 3]) for i, (p, _) in enumerate(rows)] if partition else None
    return annotations.load_annotations(_write_root(tmp_path, rows, partition=parts), need_partition=partition)


def test_default_categories_are_most_frequent_with_ties_by_name(tmp_path):
    counts = {name: 40 - i for i, name in enumerate(synthetic.DEFAULT_15)}
    # Four categories tie at 26 images for the last two places: Anorak and Blazer win by name.
    counts.update({"Anorak": 26, "Blazer": 26, "Hoodie": 26})
    loaded = _counts_root(tmp_path, counts)
    names = [loaded.categories[i].name for i in selection.choose_categories(loaded)]
    above = [n for n in synthetic.DEFAULT_15 if counts[n] > 26]
    assert len(above) == 13 and names == above + ["Anorak", "Blazer"]


def test_requested_category_without_images_or_unknown_lists_valid_ones(tmp_path):
    loaded = _counts_root(tmp_path, {"Dress": 5, "Tee": 5})
    with pytest.raises(selection.SelectionError, match=r"'Cape' has no images .*categories with images: Tee, Dress"):
        selection.select(loaded, categories=["Dress", "Cape"], max_images=4)
    with pytest.raises(selection.SelectionError, match=r"unknown category 'Frock'; valid names: Anorak, .*Sundress"):
        selection.select(loaded, categories=["Frock"], max_images=4)
    with pytest.raises(selection.SelectionError, match=r"only 2 categories have images"):
        selection.select(loaded, max_images=4)


def test_balanced_counts_spread_the_remainder_and_refuse_short_classes():
    names = [f"c{i}" for i in range(15)]
    wanted = selection.images_per_class([5013] * 15, names, 50000, "balanced")
    assert wanted == [3334] * 5 + [3333] * 10 and sum(wanted) == 50000
    with pytest.raises(selection.SelectionError, match=r"c3 has 3000, needs 3334.*--sampling proportional"):
        selection.images_per_class([5000] * 3 + [3000] + [5000] * 11, names, 50000, "balanced")
    proportional = selection.images_per_class([300, 100, 100], names[:3], 100, "proportional")
    assert proportional == [60, 20, 20]
    assert selection.images_per_class([300, 100, 100], names[:3], 0, "proportional") == [300, 100, 100]


def test_grouped_split_keeps_folders_whole_and_is_deterministic(tmp_path):
    loaded = _counts_root(tmp_path, {"Dress": 90, "Tee": 80, "Skirt": 70}, folder_size=2)
    names, chosen = selection.select(loaded, categories=["Dress", "Tee", "Skirt"], max_images=180, seed=3)
    assert names == ["Dress", "Tee", "Skirt"]
    assert len(chosen) == 180 and len({c.image.path for c in chosen}) == 180
    split_of_folder = collections.defaultdict(set)
    for c in chosen:
        split_of_folder[selection.product_folder(c.image.path)].add(c.split)
        assert c.class_name == names[c.label] and c.image.category == _label(c.class_name) - 1
    assert all(len(s) == 1 for s in split_of_folder.values())
    per_split = collections.Counter(c.split for c in chosen)
    assert abs(per_split["train"] - 144) <= 6 and abs(per_split["val"] - 18) <= 6 and abs(per_split["test"] - 18) <= 6
    again = selection.select(loaded, categories=["Dress", "Tee", "Skirt"], max_images=180, seed=3)[1]
    assert [(c.image.path, c.split) for c in again] == [(c.image.path, c.split) for c in chosen]
    other = selection.select(loaded, categories=["Dress", "Tee", "Skirt"], max_images=180, seed=4)[1]
    assert [(c.image.path, c.split) for c in other] != [(c.image.path, c.split) for c in chosen]


def test_official_split_follows_the_partition_file(tmp_path):
    loaded = _counts_root(tmp_path, {"Dress": 9, "Tee": 9}, partition=True)
    _, chosen = selection.select(loaded, categories=["Dress", "Tee"], max_images=0, split="official")
    assert all(c.split == loaded.partition[c.image.path][0] for c in chosen)
    with pytest.raises(selection.SelectionError, match="--split must be"):
        selection.select(loaded, categories=["Dress", "Tee"], max_images=0, split="8:1")


def test_grouped_split_matches_ratios_at_paper_scale():
    rng = np.random.default_rng(0)
    images, labels = [], []
    for c in range(15):
        n = folder = 0
        while n < 3333:
            size = min(3333 - n, int(rng.integers(1, 40)))
            source = annotations.SourceLine("x", 1)
            images += [annotations.LabelledImage(f"img/P{c}_{folder}/img_{j}.jpg", c, source) for j in range(size)]
            labels += [c] * size
            n, folder = n + size, folder + 1
    splits = selection.grouped_split(images, labels, 15, [0.8, 0.1, 0.1], np.random.default_rng(0))
    for c in range(15):
        got = collections.Counter(s for s, lb in zip(splits, labels) if lb == c)
        assert abs(got["train"] - 2666.4) <= 3 and abs(got["val"] - 333.3) <= 3 and abs(got["test"] - 333.3) <= 3
