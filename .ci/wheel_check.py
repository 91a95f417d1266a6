"""Checks an installed fastconformer wheel; run by .ci/wheel_smoke.py with the fresh venv's
``python -I``, from a folder outside the checkout.

Usage: python -I wheel_check.py CHECKOUT
Checks that fastconformer, fastconformer.modules and fastconformer.kernels import from the venv's
site-packages (not from CHECKOUT), that no top-level ``kernels`` module is importable, that the
package data (ImageNet class names) is installed, and that create_model(..., fast=True) gives the
logits of the float64 reference with the same weights within MODEL_TOL on a random
(2, 3, 224, 224) float32 batch in eval mode. Exits 1 with a line saying what failed (for a
module the wheel lacks, the traceback of the ImportError).
"""

import importlib.util
import sys
import sysconfig
from pathlib import Path

import torch

import fastconformer
import fastconformer.kernels
import fastconformer.modules
from fastconformer.convert import is_converted
from fastconformer.data import imagenet_classes
from fastconformer.testing import MODEL_TOL, compare, randomize_module, to_float64

MODEL = "conformer_tiny_patch16"


def fail(message: str) -> None:
    print(f"wheel check: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    checkout = Path(sys.argv[1]).resolve()
    site_packages = Path(sysconfig.get_paths()["purelib"]).resolve()
    for module in (fastconformer, fastconformer.modules, fastconformer.kernels):
        path = Path(module.__file__).resolve()
        if not path.is_relative_to(site_packages) or path.is_relative_to(checkout):
            fail(f"{module.__name__} was imported from {path}, expected the venv's {site_packages}")
    if importlib.util.find_spec("kernels") is not None:
        fail(f"a top-level `kernels` module is importable ({importlib.util.find_spec('kernels').origin}); "
             "the wheel must install the kernels only as fastconformer.kernels")
    if len(imagenet_classes()) != 1000:
        fail(f"fastconformer/imagenet_classes.tsv holds {len(imagenet_classes())} class names, expected 1000")

    torch.manual_seed(0)
    fast = fastconformer.create_model(MODEL, fast=True)
    if not is_converted(fast):
        fail(f"create_model({MODEL!r}, fast=True) returned an unconverted model")
    randomize_module(fast, torch.Generator().manual_seed(0))
    reference = fastconformer.create_model(MODEL)
    reference.load_state_dict(fast.state_dict(), strict=True)
    fast.eval()
    reference.eval().double()
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        result = compare(fast(images), reference(to_float64(images)), fp32_tol=MODEL_TOL,
                         name=f"{MODEL} fast vs float64 reference logits")
    if not result.passed:
        fail(str(result))
    print(f"imported from {site_packages}; {result}")


if __name__ == "__main__":
    main()
