"""TFDS dataset `deepfashion15`: `tfds build data_pipeline/deepfashion15 --manual_dir DIR`."""

from data_pipeline.conversion.deepfashion15.deepfashion15_dataset_builder import Builder

__all__ = ["Builder"]
