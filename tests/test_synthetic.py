"""The synthetic DeepFashion has the real on-disk format and learnable classes."""

import collections
import re

import numpy as np
import pytest
from PIL import Image

from data_pipeline.conversion import annotations
from data_pipeline.conversion import selection
from data_pipeline.conversion import synthetic


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.generate(tmp_path_factory.mktemp("synthetic"), 300, seed=7)


def test_fifty_real_categories_with_types():
    assert len(synthetic.CATEGORIES) == 50
    names = [n for n, _ in synthetic.CATEGORIES]
    assert names[:3] == ["Anorak", "Blazer", "Blouse"] and names[-1] == "Sundress"
    types = collections.Counter(t for _, t in synthetic.CATEGORIES)
    assert types == {1: 20, 2: 16, 3: 14}
    assert dict(synthetic.CATEGORIES)["Dress"] == 3 and dict(synthetic.CATEGORIES)["Jeans"] == 2


def test_list_files_have_both_headers_and_padded_columns(root):
    expected = {
        "Anno/list_category_cloth.txt": ("category_name  category_type", 2),
        "Anno/list_category_img.txt": ("image_name  category_label", 2),
        "Anno/list_bbox.txt": ("image_name  x_1  y_1  x_2  y_2", 5),
        "Eval/list_eval_partition.txt": ("image_name  evaluation_status", 2),
    }
    for relative, (header, columns) in expected.items():
        lines = (root / relative).read_text().splitlines()
        assert int(lines[0]) == len(lines) - 2 == (50 if "cloth" in relative else 300)
        assert lines[1] == header
        assert all(len(line.split()) == columns for line in lines[2:])
        assert all(re.search(r"\S {2,}\S", line) for line in lines[2:])  # runs of spaces pad the columns


def test_labels_empties_repeated_names_boxes_and_partition(root):
    loaded = annotations.load_annotations(root, need_partition=True, need_bboxes=True)
    counts = selection.category_counts(loaded)
    names = [c.name for c in loaded.categories]
    assert {names[i] for i, c in enumerate(counts) if c == 0} >= set(synthetic.EMPTY_CATEGORIES)
    assert all(counts[names.index(n)] == 0 for n in synthetic.EMPTY_CATEGORIES)
    first_line = (root / "Anno/list_category_img.txt").read_text().splitlines()[2].split()
    assert 1 <= int(first_line[1]) <= 50  # 1-based labels in the file
    basenames = collections.Counter(p.path.rsplit("/", 1)[1] for p in loaded.images)
    assert basenames["img_00000001.jpg"] > 20  # the same file name in many product folders
    assert len({selection.product_folder(p.path) for p in loaded.images}) < len(loaded.images)
    for image in loaded.images[::10]:
        with Image.open(loaded.image_file(image.path)) as picture:
            assert picture.format == "JPEG" and max(picture.size) == 300
            box = loaded.bboxes[image.path]
            assert 0 <= box.x1 < box.x2 < picture.width and 0 <= box.y1 < box.y2 < picture.height
    by_folder = collections.defaultdict(set)
    for path, (partition, _) in loaded.partition.items():
        by_folder[selection.product_folder(path)].add(partition)
    assert any(len(s) > 1 for s in by_folder.values())  # like the official split, products straddle splits
    assert set(loaded.partition) == {p.path for p in loaded.images}


def test_default_15_are_the_most_frequent_in_real_order(root):
    loaded = annotations.load_annotations(root)
    chosen = [loaded.categories[i].name for i in selection.choose_categories(loaded)]
    assert chosen == list(synthetic.DEFAULT_15)
    counts = selection.category_counts(loaded)
    others = [c for c, cat in zip(counts, loaded.categories) if cat.name not in synthetic.DEFAULT_15]
    assert 0 < sum(others) and max(others) < min(counts[[c.name for c in loaded.categories].index(n)] for n in synthetic.DEFAULT_15)


def test_same_seed_same_dataset_and_options(tmp_path):
    a = synthetic.generate(tmp_path / "a", 20, seed=3, image_size=64, annotation_dir="Anno_coarse")
    b = synthetic.generate(tmp_path / "b", 20, seed=3, image_size=64, annotation_dir="Anno_coarse")
    assert (a / "Anno_coarse/list_bbox.txt").read_text() == (b / "Anno_coarse/list_bbox.txt").read_text()
    loaded = annotations.load_annotations(a)
    assert loaded.annotation_dir == "Anno_coarse" and len(loaded.images) == 20
    path = loaded.images[5].path
    assert (a / "Img" / path).read_bytes() == (b / "Img" / path).read_bytes()
    assert max(Image.open(a / "Img" / path).size) == 64


def test_classes_are_learnable_from_small_images(root):
    """A random forest on 16x16 thumbnails beats chance (1/15) by far on held-out folders."""
    from sklearn.ensemble import RandomForestClassifier

    loaded = annotations.load_annotations(root)
    class_names, chosen = selection.select(loaded, max_images=0, sampling="proportional", split="7:0:3", seed=0)
    features = {s.image.path: np.asarray(Image.open(loaded.image_file(s.image.path)).convert("RGB").resize((16, 16)),
                                         dtype=np.float32).ravel() for s in chosen}
    train = [s for s in chosen if s.split == "train"]
    test = [s for s in chosen if s.split == "test"]
    forest = RandomForestClassifier(n_estimators=100, random_state=0, n_jobs=1)
    forest.fit([features[s.image.path] for s in train], [s.label for s in train])
    accuracy = np.mean(forest.predict([features[s.image.path] for s in test]) == [s.label for s in test])
    assert len(test) > 50 and accuracy > 3 / len(class_names), accuracy
