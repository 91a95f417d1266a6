"""The official evaluation preprocessing (or the one a pretrained_cfg describes) and the ImageNet-1k
class names (Pillow and torch only)."""

from __future__ import annotations

import functools
import importlib.resources
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MAX_ASPECT_RATIO", "create_transform", "eval_transform", "load_image",
           "load_images", "imagenet_classes"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Longest side over shortest side that eval_transform accepts: beyond it the centre crop keeps a
# sliver of the image (under 2% of the long side), and the short-side resize would make an
# unbounded image (a 1 x 20000 line: 256 x 5,120,000 pixels). At the limit it makes 256 x 12800.
MAX_ASPECT_RATIO = 50

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _intensities(image: Image.Image) -> Image.Image:
    """A 16-bit or 32-bit integer or float grayscale image -> mode "F" with values in [0, 1]."""
    values = np.asarray(image, dtype=np.float32)
    if image.mode == "F":
        if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
            raise ValueError(f"float image with values in [{values.min():.4g}, {values.max():.4g}]; float images "
                             "are read as intensities in [0, 1]: scale it first or save it as 8- or 16-bit")
    else:
        if image.mode == "I" and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"32-bit integer image with values in [{values.min():.0f}, {values.max():.0f}]; "
                             "integer images are read as 16-bit (0..65535): save it as 8- or 16-bit")
        values = values / 65535.0
    return Image.fromarray(values)


_INTERPOLATIONS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def eval_transform(image: Image.Image, resize: int = 256, crop: int = 224, *,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                   interpolation: str = "bicubic") -> torch.Tensor:
    """The official evaluation preprocessing of one image -> float32 (3, crop, crop): resize the
    short side to ``resize`` (``interpolation``: bicubic, bilinear or nearest), centre-crop
    ``crop``, scale to [0, 1], normalise with ``mean`` and ``std`` (per channel; ImageNet's by
    default).

    The resized image is at most ``resize`` x ``resize * MAX_ASPECT_RATIO`` pixels: the aspect
    ratio is bounded, and the source size by Pillow's decompression-bomb limit when it is read.

    Modes: 8-bit images ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", ...) go through
    ``convert("RGB")`` as in the official evaluation (and timm's and torchvision's loaders): a
    palette is expanded, an alpha channel is dropped (the colour stored under it is used; pixels are
    not composited onto a background), CMYK is converted without a colour profile. Grayscale of
    more than 8 bits keeps its precision: 16-bit ("I;16", "I;16B", ...) is divided by 65535, as
    is "I" (Pillow's mode for 32-bit integers) when its values lie in 0..65535; "F" (float) is read
    as intensities in [0, 1]; each is resampled in float and repeated to 3 channels.

    Raises TypeError when ``image`` is not a PIL image; ValueError for an empty image, an aspect
    ratio above :data:`MAX_ASPECT_RATIO`, "I" values outside 0..65535, "F" values outside [0, 1]
    (or not finite), a mode Pillow cannot convert to RGB, or ``crop`` > ``resize``.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {interpolation!r}")
    if not 0 < crop <= resize:
        raise ValueError(f"crop must be positive and at most resize, got crop={crop}, resize={resize}")
    w, h = image.size
    if min(w, h) < 1:
        raise ValueError(f"the image is empty ({w}x{h})")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ValueError(f"the image is {w}x{h}, an aspect ratio of {max(w, h) / min(w, h):.0f}:1; "
                         f"at most {MAX_ASPECT_RATIO}:1 is supported (the centre crop would keep a sliver of it)")
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        image = _intensities(image)
    else:
        try:
            image = image.convert("RGB")
        except ValueError as err:
            raise ValueError(f"image mode {image.mode!r} is not supported ({err})") from err
    # The whole image is resized, then cropped, as the official evaluation does (torchvision's
    # rounding): resampling only the crop's source box gives other pixels, since Pillow picks the
    # order of its two 8-bit rounding passes from the sizes involved.
    new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    image = image.resize((new_w, new_h), _INTERPOLATIONS[interpolation])
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    if image.mode == "F":
        gray = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).clamp_(0.0, 1.0)
        pixels = gray.expand(3, crop, crop)
    else:
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def create_transform(pretrained_cfg: Mapping[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform a ``pretrained_cfg`` describes (``model.pretrained_cfg``, timm's
    keys), as a function of one PIL image -> float32 (3, H, W): :func:`eval_transform` with the
    short side resized to floor(H / crop_pct), a centre crop of ``input_size`` (C, H, W) (square,
    3 channels), its interpolation, mean and std. The published variants' cfg gives the official
    preprocessing (256, bicubic, crop 224, ImageNet mean/std)."""
    missing = [k for k in ("input_size", "crop_pct", "interpolation", "mean", "std") if k not in pretrained_cfg]
    if missing:
        raise ValueError(f"pretrained_cfg lacks {', '.join(missing)}")
    channels, height, width = pretrained_cfg["input_size"]
    if channels != 3 or height != width:
        raise ValueError(f"create_transform makes square 3-channel crops; input_size is "
                         f"{tuple(pretrained_cfg['input_size'])}")
    crop_pct = pretrained_cfg["crop_pct"]
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    return functools.partial(eval_transform, resize=math.floor(height / crop_pct), crop=height,
                             mean=tuple(pretrained_cfg["mean"]), std=tuple(pretrained_cfg["std"]),
                             interpolation=pretrained_cfg["interpolation"])


def load_image(path: str | os.PathLike, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """One image file (its first frame) -> float32 (3, crop, crop) through :func:`eval_transform`.

    Raises OSError when the file cannot be read or is not an image Pillow knows, ValueError for
    what :func:`eval_transform` refuses and for an image beyond Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``).
    """
    try:
        with Image.open(path) as image:
            return eval_transform(image, resize, crop)
    except Image.DecompressionBombError as err:
        raise ValueError(str(err)) from err


def load_images(paths: list[str | os.PathLike], resize: int = 256, crop: int = 224) -> torch.Tensor:
    """Images from files -> (len(paths), 3, crop, crop) through :func:`load_image` (which says what
    it raises; the first file that fails stops the batch)."""
    return torch.stack([load_image(path, resize, crop) for path in paths])


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in label order (the WordNet lemmas of the synsets)."""
    text = importlib.resources.files("fastconformer").joinpath("imagenet_classes.tsv").read_text()
    return tuple(line.split("\t", 1)[1] for line in text.splitlines() if line)
