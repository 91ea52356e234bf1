"""Schemas of the `dataset` group: one per dataset family, each `params` mirroring the keyword
arguments of its dataset class (the registry's builder supplies `transform` and any fixed
argument, so those are absent).

`allow_outside_root` (every dataset that reads paths from metadata files, default false): a
path a metadata file gives that leads outside the dataset root (an absolute path, a '..' part)
is read only when it is true; otherwise its item is skipped with that reason (and metadata in
which every path does so is refused). Symbolic links inside the root are followed either way."""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any

from omegaconf import MISSING


@dataclass
class DatasetConfig:
    """Any dataset: a registered name, the split it is reported as, and its parameters (typed by
    the family schemas below; untyped for a dataset registered elsewhere)."""

    name: str = MISSING
    split: str = MISSING
    params: Any = MISSING


@dataclass
class SyntheticParams:
    """`SyntheticShapes` (two_class is fixed by the dataset name). `first_index` is left out:
    it is a training-data option (train.train_params) and a new key here would change the
    map-store key of every synthetic run."""

    split: str = "val"
    num_images: int = 500
    seed: int = 0
    image_size: int = 224
    version: str = "v3"  # the drawing rules (datasets/synthetic.py); in every image id and map-store key


@dataclass
class ImageNetParams:
    """`ImageNetVal`."""

    root: str = MISSING
    split: str = "val"
    layout: str = "auto"
    metadata: str | None = None
    annotations: str | None = None
    synsets: str | None = None
    num_images: int | None = None
    size_mismatch: str = "scale"
    allow_outside_root: bool = False


@dataclass
class VocParams:
    """`VocDataset` in detection mode (ImageSets/Main)."""

    root: str = MISSING
    split: str = "val"
    mode: str = "detection"
    multi_label: str | None = None
    num_images: int | None = None
    allow_outside_root: bool = False


@dataclass
class VocSegmentationParams:
    """`VocDataset` with mode fixed to segmentation by the dataset name."""

    root: str = MISSING
    split: str = "val"
    multi_label: str | None = None
    num_images: int | None = None
    allow_outside_root: bool = False


@dataclass
class CubParams:
    """`CubDataset`."""

    root: str = MISSING
    split: str = "test"
    layout: str = "auto"
    metadata: str | None = None
    segmentations: str | None = None
    num_images: int | None = None
    allow_outside_root: bool = False


@dataclass
class OpenImagesParams:
    """`OpenImagesDataset` (wsolevaluation's OpenImages30k metadata layout)."""

    root: str = MISSING
    metadata: str | None = None
    split: str = "test"
    num_images: int | None = None
    allow_outside_root: bool = False


@dataclass
class ImageNetSegmentationParams:
    """`ImageNetSegmentation` (Chefer et al.'s gtsegs_ijcv.mat)."""

    file: str = MISSING
    num_images: int | None = None


def dataset_schema(params: type) -> type[DatasetConfig]:
    """The schema of one dataset family: `DatasetConfig` with `params` typed by `params`."""
    name = params.__name__.removesuffix("Params") + "Dataset"
    return make_dataclass(name, [("params", params, field(default_factory=params))], bases=(DatasetConfig,))


# dataset name -> schema; the YAML file of each lists `/schema_dataset_<name>` in its defaults
DATASET_SCHEMAS: dict[str, type[DatasetConfig]] = {
    "synthetic": dataset_schema(SyntheticParams),
    "imagenet": dataset_schema(ImageNetParams),
    "voc": dataset_schema(VocParams),
    "voc_segmentation": dataset_schema(VocSegmentationParams),
    "cub": dataset_schema(CubParams),
    "openimages": dataset_schema(OpenImagesParams),
    "imagenet_segmentation": dataset_schema(ImageNetSegmentationParams),
}
DATASET_SCHEMAS["synthetic_two_class"] = DATASET_SCHEMAS["synthetic"]
