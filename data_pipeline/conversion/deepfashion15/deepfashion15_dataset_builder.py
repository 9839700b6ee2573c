"""DeepFashion-15 as a TensorFlow Datasets builder, for people who already use TFDS.

    tfds build data_pipeline/deepfashion15 --manual_dir /path/to/DeepFashion/Category_and_Attribute

It reuses the parsers and the selection of `python -m data_pipeline.conversion.deepfashion`, so both
routes pick the same images, labels and grouped 8:1:1 split for the same seed. Training
in this project reads the converter's shards and manifest, not TFDS's; this builder is
for comparing with other TFDS-based code.
"""

from __future__ import annotations

import dataclasses

import tensorflow_datasets as tfds

from data_pipeline.conversion import deepfashion
from data_pipeline.records import example_codec
from data_pipeline.conversion import selection
from data_pipeline.conversion import shard_writer
from data_pipeline.conversion import synthetic
from data_pipeline.conversion.annotations import load_annotations

_SPLIT_NAMES = {"train": tfds.Split.TRAIN, "val": tfds.Split.VALIDATION, "test": tfds.Split.TEST}


@dataclasses.dataclass
class DeepFashion15Config(tfds.core.BuilderConfig):
    max_images: int = 50000  # 0: as many as a class-balanced draw allows
    split: str = "8:1:1"
    seed: int = 0


class Builder(tfds.core.GeneratorBasedBuilder):
    """The 15 most frequent DeepFashion categories, 50,000 images, split 8:1:1 by product."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release: the paper's protocol as read in PAPER.md section 3."}
    BUILDER_CONFIGS = [
        DeepFashion15Config(name="paper", description="50,000 images drawn class-balanced, 8:1:1 by product folder."),
        DeepFashion15Config(name="balanced_all", max_images=0,
                            description="As many images as a class-balanced draw allows (for small or synthetic copies)."),
        DeepFashion15Config(name="official_split", split="official",
                            description="50,000 images drawn class-balanced, split by Eval/list_eval_partition.txt."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    DeepFashion cannot be downloaded by code. From the DeepFashion project page
    (https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion.html), request access to the
    "Category and Attribute Prediction Benchmark", download Anno/ (or Anno_coarse/),
    Eval/ and Img/img.zip, and unzip img.zip inside Img/, giving
    Img/img/<Product_Folder>/img_XXXXXXXX.jpg. Pass the folder that holds Anno/, Eval/
    and Img/ as --manual_dir.
    """

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names=list(synthetic.DEFAULT_15)),
                "filename": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion.html",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        config = self.builder_config
        annotations = load_annotations(dl_manager.manual_dir, need_partition=config.split == "official")
        class_names, chosen = selection.select(annotations, categories=list(synthetic.DEFAULT_15),
                                               max_images=config.max_images, split=config.split, seed=config.seed)
        tasks = {name: [] for name in _SPLIT_NAMES}
        for item in chosen:
            tasks[item.split].append(deepfashion.ImageTask(
                file=str(annotations.image_file(item.image.path)), relative_path=item.image.path,
                label=item.label, class_name=item.class_name, source=str(item.image.source)))
        return {_SPLIT_NAMES[name]: self._generate_examples(split_tasks) for name, split_tasks in tasks.items()}

    def _generate_examples(self, tasks):
        for task in tasks:
            encoded = deepfashion.encode_image_task(task)  # fully decodes: a broken image stops the build
            if encoded.problem is not None:
                raise shard_writer.BadImageError(f"{encoded.description}: {encoded.problem}")
            example = example_codec.decode_example(encoded.record)
            yield task.relative_path, {"image": example["image/encoded"], "label": task.label,
                                       "filename": task.relative_path}
