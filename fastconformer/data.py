"""The official evaluation preprocessing and the ImageNet-1k class names (Pillow and torch only)."""

from __future__ import annotations

import functools
import importlib.resources
import os

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "eval_transform", "load_images", "imagenet_classes"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_transform(image: Image.Image, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """The official evaluation preprocessing of one image -> float32 (3, crop, crop): resize the
    short side to ``resize`` (bicubic), centre-crop ``crop``, scale to [0, 1], normalise with the
    ImageNet mean and std."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = resize, int(resize * h / w)
    else:
        new_w, new_h = int(resize * w / h), resize
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (pixels - mean) / std


def load_images(paths: list[str | os.PathLike], resize: int = 256, crop: int = 224) -> torch.Tensor:
    """Images from files -> (len(paths), 3, crop, crop) through :func:`eval_transform`."""
    batch = []
    for path in paths:
        with Image.open(path) as image:
            batch.append(eval_transform(image, resize, crop))
    return torch.stack(batch)


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in label order (the WordNet lemmas of the synsets)."""
    text = importlib.resources.files("fastconformer").joinpath("imagenet_classes.tsv").read_text()
    return tuple(line.split("\t", 1)[1] for line in text.splitlines() if line)
