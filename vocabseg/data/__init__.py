"""Datasets, class-name lists and training/evaluation transforms.

    from vocabseg.data import build_dataset, build_train_transform, collate_batch
    ds = build_dataset("ade150", "datasets/", split="val")          # or "custom", "path/to/folder"
    ds.class_names, ds.ignore_index, ds.files, ds[0]["label"]
"""

from .datasets import (
    CLASS_LISTS,
    DATASETS,
    IGNORE_INDEX,
    WIDE_IGNORE_INDEX,
    SegmentationDataset,
    build_dataset,
    ignore_index_for,
    load_class_names,
    read_class_file,
)
from .transforms import (
    Compose,
    PadToSize,
    PhotometricDistortion,
    RandomCrop,
    RandomFlip,
    RandomResize,
    Resize,
    build_eval_transform,
    build_train_transform,
    collate_batch,
    short_side_choices,
)

__all__ = [
    "CLASS_LISTS",
    "DATASETS",
    "IGNORE_INDEX",
    "WIDE_IGNORE_INDEX",
    "SegmentationDataset",
    "build_dataset",
    "ignore_index_for",
    "load_class_names",
    "read_class_file",
    "Compose",
    "PadToSize",
    "PhotometricDistortion",
    "RandomCrop",
    "RandomFlip",
    "RandomResize",
    "Resize",
    "build_eval_transform",
    "build_train_transform",
    "collate_batch",
    "short_side_choices",
]
