"""The ``fastconformer`` command line."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__
from .dispatch import interpreter_enabled, triton_available
from .registry import VARIANTS


def _triton_version() -> str:
    if not triton_available():
        return "not installed"
    import triton

    return triton.__version__


def cmd_info(args: argparse.Namespace) -> int:
    """Variants with parameter counts, and what this machine offers the kernels."""
    print(f"fastconformer {__version__}  (Python {platform.python_version()}, torch {torch.__version__}, "
          f"triton {_triton_version()})")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        print(f"device: CUDA {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}): Triton kernels run by default")
    else:
        print(f"device: CPU ({torch.get_num_threads()} threads), no CUDA: the PyTorch implementations run"
              + ("; TRITON_INTERPRET=1 lets backend('triton') run kernels in the interpreter"
                 if not interpreter_enabled() else "; the Triton interpreter is enabled"))
    print()
    print(f"{'model':<26}{'params':>14}{'patch':>7}{'embed':>7}{'heads':>7}{'top-1':>8}")
    for name, v in VARIANTS.items():
        print(f"{name:<26}{v.num_params:>14,}{v.kwargs['patch_size']:>7}{v.kwargs['embed_dim']:>7}"
              f"{v.kwargs['num_heads']:>7}{v.top1:>7.1f}%")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastconformer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fastconformer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="variants, parameter counts, device and Triton availability").set_defaults(
        func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
