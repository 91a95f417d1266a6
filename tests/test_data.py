"""The evaluation preprocessing on ordinary, high-bit-depth, odd-mode and hostile images, and the one a
pretrained_cfg describes."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

import fastconformer
from fastconformer.data import (IMAGENET_MEAN, IMAGENET_STD, MAX_ASPECT_RATIO, create_transform, eval_transform,
                                load_image, load_images)

skimage_data = pytest.importorskip("skimage.data")


def _pixels(tensor: torch.Tensor) -> torch.Tensor:
    """A normalised (3, H, W) tensor back in [0, 1] pixel units."""
    return tensor * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def _resize_then_crop(image: Image.Image, resize: int = 256, crop: int = 224) -> torch.Tensor:
    """The official transform done the plain way: resize the whole image, then crop (in [0, 1])."""
    image = image.convert("RGB")
    w, h = image.size
    new_w, new_h = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - crop) / 2.0)), int(round((new_h - crop) / 2.0))
    image = image.crop((left, top, left + crop, top + crop))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


# The photos at their own sizes and at sizes where resampling only the crop's source box gave
# pixels up to 7 levels away (Pillow picks the order of its two rounding passes from the sizes).
SIZES = [None, (257, 300), (253, 375), (270, 400), (300, 1000), (230, 259), (700, 233)]


@pytest.mark.parametrize("photo", ["chelsea", "astronaut", "coffee"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "own" if s is None else f"{s[0]}x{s[1]}")
def test_equals_resize_then_crop_on_photos(photo, size):
    image = Image.fromarray(getattr(skimage_data, photo)())
    if size is not None:
        image = image.resize(size, Image.BILINEAR)
    torch.testing.assert_close(_pixels(eval_transform(image)), _resize_then_crop(image), rtol=0, atol=1e-6)


def test_resized_image_is_bounded_at_the_aspect_limit(monkeypatch):
    """At the largest aspect ratio accepted, Pillow is asked for 256 x 12800 pixels, whatever the
    source size (a 1 x 20000 line would have asked for 256 x 5,120,000)."""
    calls = []
    resize = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        calls.append(size)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40 * MAX_ASPECT_RATIO, 40, 3), np.uint8))
    assert eval_transform(image).shape == (3, 224, 224)
    assert calls == [(256, 256 * MAX_ASPECT_RATIO)]


def test_refuses_an_absurd_aspect_ratio_at_once(tmp_path):
    path = tmp_path / "line.png"
    Image.new("L", (1, 20000)).save(path)  # a few hundred bytes; resizing it whole took ~20 s and 5 GB
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"1x20000, an aspect ratio of 20000:1; at most {MAX_ASPECT_RATIO}:1"):
        load_image(path)
    assert time.perf_counter() - start < 2.0


def test_refuses_a_decompression_bomb(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the file is over twice the limit
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(path)


def _gray_photo() -> np.ndarray:
    return skimage_data.camera()[::2, ::2]  # uint8 (256, 256)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_images_keep_their_scale(tmp_path, suffix):
    """A 16-bit file reads as the 8-bit image it was scaled from (x 257), to the rounding of the
    8-bit path; convert("RGB") clipped it to white before."""
    gray = _gray_photo()
    path = tmp_path / f"gray16{suffix}"
    Image.fromarray(gray.astype(np.uint16) * 257).save(path)
    with Image.open(path) as image:
        assert image.mode == "I;16"
    diff = (_pixels(load_image(path)) - _pixels(eval_transform(Image.fromarray(gray)))).abs()
    assert diff.max() <= 3 / 255 and diff.mean() < 0.5 / 255


def test_integer_and_float_images_read_as_intensities(tmp_path):
    gray = _gray_photo()
    eight_bit = _pixels(eval_transform(Image.fromarray(gray)))
    as_int32 = Image.fromarray(gray.astype(np.int32) * 257)
    as_float = Image.fromarray(gray.astype(np.float32) / 255)
    path = tmp_path / "float.tif"
    as_float.save(path)
    assert (as_int32.mode, as_float.mode) == ("I", "F")
    for out in (eval_transform(as_int32), eval_transform(as_float), load_image(path)):
        diff = (_pixels(out) - eight_bit).abs()
        assert diff.max() <= 3 / 255 and diff.mean() < 0.5 / 255


@pytest.mark.parametrize("image, message", [
    (Image.fromarray(np.full((8, 8), 70000, np.int32)), r"values in \[70000, 70000\].*16-bit"),
    (Image.fromarray(np.full((8, 8), 2.0, np.float32)), r"values in \[2, 2\].*intensities in \[0, 1\]"),
    (Image.fromarray(np.full((8, 8), np.nan, np.float32)), r"values in \[nan, nan\]"),
    (Image.new("La", (8, 8)), "image mode 'La' is not supported"),
    (Image.new("RGB", (0, 5)), r"empty \(0x5\)"),
], ids=["int32-beyond-16-bit", "float-above-1", "float-nan", "unsupported-mode", "empty"])
def test_refusals_say_what_is_supported(image, message):
    with pytest.raises(ValueError, match=message):
        eval_transform(image)


def _save(image: Image.Image, path):
    image.save(path)
    return path


@pytest.mark.parametrize("mode", ["1", "L", "P", "P+transparency", "LA", "RGBA", "CMYK"])
def test_other_modes_are_read_as_the_official_loader_reads_them(tmp_path, mode):
    """convert("RGB") as the official evaluation's loader: palettes expanded, alpha dropped."""
    rgb = Image.fromarray(skimage_data.astronaut()[::2, ::2])
    if mode == "P+transparency":
        image = rgb.convert("P")
        image.info["transparency"] = 0
    elif mode in ("LA", "RGBA"):
        image = rgb.convert(mode)
        image.putalpha(Image.linear_gradient("L").resize(rgb.size))
    else:
        image = rgb.convert(mode)
    path = _save(image, tmp_path / ("image.tif" if mode == "CMYK" else "image.png"))
    with Image.open(path) as opened:
        assert opened.mode == mode.split("+")[0]
        expected = eval_transform(opened.convert("RGB"))
    assert torch.equal(load_image(path), expected)


def test_load_images_stacks(tmp_path):
    paths = [_save(Image.fromarray(skimage_data.chelsea()), tmp_path / "a.png"),
             _save(Image.fromarray(_gray_photo()), tmp_path / "b.png")]
    batch = load_images(paths)
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.float32
    assert torch.equal(batch[1], load_image(paths[1]))


def test_create_transform_from_a_pretrained_cfg():
    image = Image.fromarray(skimage_data.chelsea())
    with torch.device("meta"):
        cfg = fastconformer.create_model("conformer_small_patch16").pretrained_cfg
    assert (cfg["input_size"], cfg["interpolation"], cfg["crop_pct"], cfg["mean"], cfg["std"]) == (
        (3, 224, 224), "bicubic", 0.875, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(create_transform(cfg)(image), eval_transform(image))  # the official evaluation
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    other = {**cfg, "input_size": (3, 192, 192), "crop_pct": 0.75, "interpolation": "bilinear", "mean": mean,
             "std": std}
    out = create_transform(other)(image)
    assert out.shape == (3, 192, 192)
    assert torch.equal(out, eval_transform(image, 256, 192, mean=mean, std=std, interpolation="bilinear"))
    assert not torch.equal(out, eval_transform(image, 256, 192, mean=mean, std=std))


@pytest.mark.parametrize("change, message", [
    (dict(input_size=(3, 224, 192)), r"square 3-channel crops; input_size is \(3, 224, 192\)"),
    (dict(crop_pct=0), r"crop_pct must be in \(0, 1\], got 0"),
    (dict(interpolation="lanczos2"), "interpolation must be one of bicubic, bilinear, nearest, got 'lanczos2'"),
    (dict(mean=None), "pretrained_cfg lacks mean"),
])
def test_create_transform_refuses_what_it_cannot_make(change, message):
    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875, "mean": IMAGENET_MEAN,
           "std": IMAGENET_STD, **change}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        create_transform(cfg)(Image.new("RGB", (300, 300)))
