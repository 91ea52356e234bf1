"""Dataset registry: names used in configs -> builder functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import Dataset

from wsol_bench.registry import Registry

from .cub import CubDataset
from .imagenet import ImageNetVal
from .imagenet_segmentation import ImageNetSegmentation
from .openimages import OpenImagesDataset
from .synthetic import SyntheticShapes
from .voc import VocDataset

_BUILDERS: Registry[Callable[..., Dataset]] = Registry("dataset")


def register_dataset(name: str) -> Callable[[Callable[..., Dataset]], Callable[..., Dataset]]:
    """Decorator: make a dataset builder available under `name`."""
    return _BUILDERS.register(name)


@register_dataset("synthetic")
def _synthetic(**params: Any) -> Dataset:
    return SyntheticShapes(two_class=False, **params)


@register_dataset("synthetic_two_class")
def _synthetic_two_class(**params: Any) -> Dataset:
    return SyntheticShapes(two_class=True, **params)


@register_dataset("voc")
def _voc(**params: Any) -> Dataset:
    return VocDataset(**params)


@register_dataset("voc_segmentation")
def _voc_segmentation(**params: Any) -> Dataset:
    return VocDataset(mode="segmentation", **params)


@register_dataset("cub")
def _cub(**params: Any) -> Dataset:
    return CubDataset(**params)


@register_dataset("imagenet")
def _imagenet(**params: Any) -> Dataset:
    return ImageNetVal(**params)


@register_dataset("openimages")
def _openimages(**params: Any) -> Dataset:
    return OpenImagesDataset(**params)


@register_dataset("imagenet_segmentation")
def _imagenet_segmentation(**params: Any) -> Dataset:
    return ImageNetSegmentation(**params)


def available() -> list[str]:
    """Names of the registered datasets."""
    return _BUILDERS.names()


def build_dataset(name: str, *, transform=None, **params: Any) -> Dataset:
    """Build dataset `name` with its parameters; an unknown name lists the valid ones."""
    return _BUILDERS.lookup(name)(transform=transform, **params)
