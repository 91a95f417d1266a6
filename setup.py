"""The wheel's package list (all other metadata lives in pyproject.toml): every package under
fastconformer/ is discovered, and the top-level kernels/ folder, with any subpackage it grows, is
installed as fastconformer.kernels (a top-level `kernels` would collide with the PyPI package)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["fastconformer", "fastconformer.*"])
    + [f"fastconformer.{name}" for name in find_packages(include=["kernels", "kernels.*"])],
    package_dir={"fastconformer.kernels": "kernels"},
)
