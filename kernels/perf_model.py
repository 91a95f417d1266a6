"""The performance model: what each kernel launch of a real workload should take on an H100 SXM,
from the launch alone (its tensors' shapes and dtypes, its config and grid), next to what the
PyTorch ops it replaces must move. PERF_MODEL.md beside this file states the assumptions and holds
the table of the headline workload; ``python -m fastconformer.kernels --model [--workload ...]``
prints it.

The launches are the compile matrix's (:func:`fastconformer.kernels.compile_matrix.launches`: the
launchers run on meta tensors for a :data:`~fastconformer.kernels.compile_matrix.WORKLOADS` entry),
so the model covers exactly what launches. Each kernel has a cost function here
(:data:`COSTS`, keyed by the ``@triton.jit`` function's name) that reads the launch's arguments
and returns a :class:`Cost`: HBM bytes read and written (each input element once, each output
element once), FLOPs (executed, padding included) and transcendental ops, and the loads of one
program: how many sequential round trips to memory it makes and how many bytes it has in flight.
:func:`predict` turns a cost into a time with the occupancy of the sm_90 build (registers and
shared memory from ptxas, :func:`fastconformer.kernels.compile_matrix.compile_spec`) or, without a
build, an estimate:

    memory  = bytes / HBM bandwidth
    compute = (programs on the busiest SM) x (FLOPs per program / per-SM peak of the dot's kind
              + transcendental ops per program / per-SM SFU rate)
    latency = rounds x round trips per program x DRAM latency,
              rounds = ceil(programs on the busiest SM / CTAs per SM)
    predicted = max(memory, compute, latency)

The latency term is Little's law per SM: a program that waits for each of its loads moves
``in_flight`` bytes per latency, so an SM holding ``CTAs x in_flight`` bytes in flight moves at most
that per latency; below the ~17 KiB per SM that 3.35 TB/s x 700 ns / 132 SMs needs, the kernel
cannot reach HBM bandwidth, and the latency term says by how much.

Importing this module imports triton (through the compile matrix).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
from typing import Callable, Iterable

import torch
import triton

from . import Launch, record_launches
from .compile_matrix import WORKLOADS, Workload, compile_specs_for, compiles_natively, launches, spec_of

__all__ = ["COSTS", "H100", "HEADLINE", "Cost", "Device", "OpCall", "Prediction", "Resources", "TorchOp",
           "TORCH_BASELINES", "estimate_resources", "main", "model_report", "occupancy", "op_calls", "predict",
           "predict_call", "predictions", "table", "torch_seconds"]


@dataclasses.dataclass(frozen=True)
class Device:
    """The constants of the model's GPU."""

    name: str
    sms: int
    hbm_bytes_per_s: float
    dram_latency_s: float
    peak_flops: dict  # per second by dot kind: "fp16/bf16" and "tf32" on tensor cores (wgmma), "fp32" on FMA units
    sfu_per_s: float  # transcendental ops (exp2, erf, rsqrt) per second, all SMs
    mma_sync_fraction: float  # of the tensor-core peak that mma.sync (no wgmma) reaches on sm_90
    regs_per_sm: int
    smem_per_sm: int  # bytes
    smem_reserved_per_cta: int  # bytes the driver reserves per CTA
    max_warps_per_sm: int
    max_ctas_per_sm: int

    @property
    def in_flight_needed(self) -> float:
        """Bytes in flight per SM that Little's law needs for full HBM bandwidth."""
        return self.hbm_bytes_per_s * self.dram_latency_s / self.sms


# H100 SXM5: 132 SMs; HBM3 3.35 TB/s; dense tensor peaks 989 TFLOP/s fp16/bf16 and 495 TF32 at the
# 1.83 GHz tensor clock (4 tensor cores x 1024 FLOP/clk per SM), 67 TFLOP/s fp32 FMA (128 FMA/clk/SM at
# 1.98 GHz); 16 SFU ops/clk/SM; DRAM latency 600-800 ns under load (700 here); 228 KB shared memory
# and 64K 32-bit registers per SM, at most 64 warps and 32 CTAs per SM, 1 KB reserved shared per CTA.
H100 = Device(name="H100 SXM", sms=132, hbm_bytes_per_s=3.35e12, dram_latency_s=700e-9,
              peak_flops={"fp16/bf16": 989e12, "tf32": 495e12, "fp32": 67e12}, sfu_per_s=16 * 132 * 1.83e9,
              mma_sync_fraction=2 / 3, regs_per_sm=65536, smem_per_sm=228 * 1024, smem_reserved_per_cta=1024,
              max_warps_per_sm=64, max_ctas_per_sm=32)


@dataclasses.dataclass(frozen=True)
class Cost:
    """What one launch must do. ``steps`` and ``in_flight`` are per program (the longest one)."""

    read: int  # HBM bytes: each input element once (re-reads L2 serves are not counted)
    written: int  # HBM bytes: each output element once
    flops: float  # executed, tile padding included
    useful_flops: float  # the math the op needs
    kind: str  # what runs the FLOPs: a Device.peak_flops key
    sfu: float  # transcendental ops, executed
    steps: int  # sequential round trips to memory of one program (a load whose result it waits for)
    in_flight: int  # bytes one program has in flight at a time
    live: int  # 32-bit values one program keeps live at once (the register estimate without a build)
    staged: int  # shared-memory bytes (the estimate without a build): dot operands x stages

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclasses.dataclass(frozen=True)
class TorchOp:
    """One PyTorch op of an unfused sequence, as the roofline sees it."""

    name: str
    bytes: int
    flops: float = 0.0
    kind: str = "fp32"
    sfu: float = 0.0


class _Call:
    """A recorded launch's arguments by the kernel's parameter names, with its config and grid."""

    def __init__(self, launch: Launch):
        fn = getattr(launch.kernel, "fn", launch.kernel)  # the Python function (JITFunction or interpreter's)
        self.name = fn.__name__
        self.arg = inspect.signature(fn).bind(*launch.args, **launch.config.constexprs).arguments
        self.warps, self.stages = launch.config.num_warps, launch.config.num_stages
        self.grid = launch.grid
        self.programs = math.prod(launch.grid)

    def __getitem__(self, name: str):
        return self.arg[name]

    def nbytes(self, name: str) -> int:
        t = self.arg[name]
        return t.numel() * t.element_size()

    def size(self, name: str) -> int:
        return self.arg[name].element_size()


def _dot_kind(dtype: torch.dtype, precision: str) -> str:
    return "fp16/bf16" if dtype != torch.float32 else ("tf32" if precision == "tf32" else "fp32")


def _pipelined_steps(iterations: int, stages: int) -> int:
    """Round trips of a loop of ``iterations`` dependent loads that Triton prefetches ``stages - 1`` deep."""
    return math.ceil(iterations / max(1, stages - 1))


# ------------------------------------------------------------------------------------ the kernels' costs


def _add_layer_norm(c: _Call) -> Cost:
    M, D, es = c.programs, c["D"], c.size("x_ptr")
    rows = M * D * es
    return Cost(read=2 * rows + c.nbytes("w_ptr") + c.nbytes("b_ptr"),
                written=rows + M * D * c.size("out_ptr") + 8 * M, flops=8 * M * D, useful_flops=8 * M * D,
                kind="fp32", sfu=M, steps=1, in_flight=2 * D * es, live=4 * c["BLOCK_D"], staged=0)


def _add_layer_norm_backward(c: _Call) -> Cost:
    M, D, es = c["M"], c["D"], c.size("s_ptr")
    rows = M * D * es
    inputs = 3 if c["HAS_GRAD_SUM"] else 2
    tile_rows = c.arg.get("BLOCK_R", 1)
    return Cost(read=inputs * rows + 8 * M + c.nbytes("w_ptr"), written=rows + 2 * c.programs * D * 4,
                flops=12 * M * D, useful_flops=12 * M * D, kind="fp32", sfu=0,
                steps=math.ceil(c["rows_per_program"] / tile_rows), in_flight=tile_rows * inputs * D * es,
                live=6 * tile_rows * c["BLOCK_D"], staged=0)


def _pooled_gemm(c: _Call) -> tuple[int, float, float, int, int, int]:
    """(x2 bytes read, executed and useful FLOPs, round trips and bytes in flight per program, and
    the program's staged operand bytes) of the squeeze's pool-while-loading GEMM
    (``_window_means`` then ``tl.dot``): per K step the DW_STRIDE^2 window tiles and the weight
    tile(s) are loaded as one round of cp.async copies, prefetched num_stages - 1 steps deep."""
    x = c["x_ptr"]
    B, C, H, W = x.shape
    s, D = c["DW_STRIDE"], c["D"]
    bm, bk = c["BLOCK_M"], c["BLOCK_K"]
    bd = c["BLOCK_D"] + c.arg.get("BLOCK_D_TAIL", 0)
    n_h, n_w = H // s, W // s
    es = x.element_size()
    k_steps = math.ceil(C / bk)
    flops = 2.0 * c.programs * bm * bd * k_steps * bk
    useful = 2.0 * B * n_h * n_w * C * D
    tile = (s * s * bm + bd) * bk * es
    return (B * C * n_h * s * n_w * s * es, flops, useful, _pipelined_steps(k_steps, c.stages),
            tile * max(1, c.stages - 1), tile * max(1, c.stages))


def _fcu_down(c: _Call) -> Cost:
    B, D, tok = c["x_ptr"].shape[0], c["D"], c.size("out_ptr")
    N = c["N"]
    x2, flops, useful, steps, in_flight, staged = _pooled_gemm(c)
    columns = c["BLOCK_D"] + c["BLOCK_D_TAIL"]
    x_t = B * D * tok + (B * N * D * tok if c["ADD_X_T"] else 0)
    params = c.nbytes("w_ptr") + 3 * D * tok
    return Cost(read=x2 + x_t + params, written=B * (1 + N) * D * tok, flops=flops, useful_flops=useful,
                kind=_dot_kind(c["x_ptr"].dtype, c["DOT_PRECISION"]), sfu=c.programs * c["BLOCK_M"] * columns,
                steps=steps, in_flight=in_flight, live=c["BLOCK_M"] * columns * 2, staged=staged)


def _pooled_projection(c: _Call) -> Cost:
    B, D, C, N = c["x_ptr"].shape[0], c["D"], c["C"], c["N"]
    x2, flops, useful, steps, in_flight, staged = _pooled_gemm(c)
    es = c["x_ptr"].element_size()
    return Cost(read=x2 + c.nbytes("w_ptr") + D * c.size("bias_ptr"), written=B * N * (C * es + D * 4), flops=flops,
                useful_flops=useful, kind=_dot_kind(c["x_ptr"].dtype, c["DOT_PRECISION"]), sfu=0, steps=steps,
                in_flight=in_flight, live=c["BLOCK_M"] * c["BLOCK_D"], staged=staged)


def _layer_norm_gelu_backward(c: _Call) -> Cost:
    M, D = c["M"], c["D"]
    g = c.size("grad_ptr")
    tile_rows = c.arg.get("BLOCK_R", 1)
    return Cost(read=M * D * (4 + g) + 2 * D * c.size("ln_w_ptr"),
                written=M * D * c.size("grad_z_ptr") + 3 * c.programs * D * 4, flops=40 * M * D,
                useful_flops=40 * M * D, kind="fp32", sfu=2 * M * D, steps=math.ceil(c["rows_per_program"] / tile_rows),
                in_flight=tile_rows * D * (4 + g), live=8 * tile_rows * c["BLOCK_D"], staged=0)


def _avg_pool_backward(c: _Call) -> Cost:
    rows, cols = c["ROWS"], c["COLS"]
    es = c.size("grad_x_ptr")
    elements = rows * cols
    s = c["dw_stride"]
    return Cost(read=elements // (s * s) * c.size("grad_pooled_ptr"), written=elements * es, flops=elements,
                useful_flops=elements, kind="fp32", sfu=0, steps=1,
                in_flight=c["BLOCK_R"] * c["BLOCK_C"] * c.size("grad_pooled_ptr"),
                live=2 * c["BLOCK_R"] * c["BLOCK_C"], staged=0)


def _gemm_tile_cost(c: _Call, K: int, a_es: int, b_es: int) -> tuple[float, int, int, int]:
    """(executed FLOPs, round trips, bytes in flight and staged bytes per program) of a Triton GEMM
    with BLOCK_M x BLOCK_N tiles over K in BLOCK_K steps, prefetched num_stages - 1 deep."""
    bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
    k_steps = math.ceil(K / bk)
    tile = bm * bk * a_es + bk * bn * b_es
    flops = 2.0 * c.programs * bm * bn * k_steps * bk
    return flops, _pipelined_steps(k_steps, c.stages), tile * max(1, c.stages - 1), tile * max(1, c.stages)


def _fcu_up_expand(c: _Call) -> Cost:
    tok = c["tok_ptr"]
    B, N, C, D = tok.shape[0], c["N"], c["C"], c["D"]
    es, out_es = tok.element_size(), c.size("out_ptr")
    flops, steps, in_flight, staged = _gemm_tile_cost(c, D, es, c.size("w_ptr"))
    return Cost(read=B * N * D * es + c.nbytes("w_ptr") + 8 * C, written=B * N * C * out_es, flops=flops,
                useful_flops=2.0 * B * N * C * D, kind=_dot_kind(c["w_ptr"].dtype, c["DOT_PRECISION"]), sfu=0,
                steps=steps, in_flight=in_flight, live=c["BLOCK_M"] * c["BLOCK_N"], staged=staged)


def _fcu_up_expand_backward(c: _Call) -> Cost:
    g = c["grad_ptr"]
    B, N, C, D = g.shape[0], c["N"], c["C"], c["D"]
    es = g.element_size()
    flops, steps, in_flight, staged = _gemm_tile_cost(c, C, es, c.size("w_ptr"))
    inputs = 2 if c["apply_relu"] else 1
    return Cost(read=inputs * B * N * C * es + c.nbytes("w_ptr") + 4 * C,
                written=B * (1 + N) * D * c.size("grad_tok_ptr") + B * N * C * c.size("masked_ptr"), flops=flops,
                useful_flops=2.0 * B * N * C * D, kind=_dot_kind(g.dtype, c["DOT_PRECISION"]), sfu=0, steps=steps,
                in_flight=in_flight * inputs, live=c["BLOCK_M"] * c["BLOCK_N"], staged=staged)


def _bn_relu_add_upsampled(c: _Call) -> Cost:
    elements = c["ROWS"] * c["COLS"]
    es = c.size("x_ptr")
    up = c["up"]
    low = elements // (up * up) * c.size("low_ptr")
    tile = c["BLOCK_R"] * c["BLOCK_C"]
    return Cost(read=elements * es + low + 8 * c["C"], written=elements * c.size("out_ptr"), flops=3 * elements,
                useful_flops=3 * elements, kind="fp32", sfu=0, steps=1, in_flight=tile * (es + c.size("low_ptr")),
                live=3 * tile, staged=0)


def _bn_relu_add_upsampled_backward(c: _Call) -> Cost:
    low = c["ROWS"] * c["COLS"]
    up = c["up"]
    full = low * up * up
    es = c.size("x_ptr")
    tile = c["BLOCK_R"] * c["BLOCK_C"]
    partials = 2 * c.nbytes("partial_scale_ptr")
    return Cost(read=2 * full * es + 8 * c["C"], written=full * es + low * c.size("grad_low_ptr") + partials,
                flops=6 * full, useful_flops=6 * full, kind="fp32", sfu=0, steps=up * up, in_flight=2 * tile * es,
                live=5 * tile, staged=0)


def _attention_shape(c: _Call) -> tuple[int, int, int, int, int]:
    """(B, N, heads, head_dim, element size) of an attention launch."""
    qkv = c["qkv_ptr"]
    return qkv.shape[0], c["N"], c["H"], c["head_dim"], qkv.element_size()


def _attention_fwd(c: _Call) -> Cost:
    B, N, H, dh, es = _attention_shape(c)
    bm, bn, bdh = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_DH"]
    n_blocks = math.ceil(N / bn)
    scores = c.programs * bm * n_blocks * bn  # executed logits, padding included
    kv_tile = 2 * bn * bdh * es
    return Cost(read=3 * B * N * H * dh * es, written=B * N * H * dh * c.size("out_ptr") + 4 * B * H * N,
                flops=4.0 * scores * bdh, useful_flops=4.0 * B * H * N * N * dh,
                kind=_dot_kind(c["qkv_ptr"].dtype, c["INPUT_PRECISION"]), sfu=scores,
                steps=1 + _pipelined_steps(n_blocks, c.stages), in_flight=kv_tile * max(1, c.stages - 1),
                live=bm * (2 * bdh + bn), staged=bm * bdh * es + kv_tile * max(1, c.stages))


def _attention_bwd_preprocess(c: _Call) -> Cost:
    out = c["out_ptr"]
    B, N, H, dh = out.shape[0], c["N"], c["H"], c["head_dim"]
    es = out.element_size()
    tile = c["BLOCK_M"] * c["BLOCK_DH"]
    return Cost(read=2 * B * N * H * dh * es, written=4 * B * H * N, flops=2 * B * N * H * dh,
                useful_flops=2 * B * N * H * dh, kind="fp32", sfu=0, steps=1, in_flight=2 * tile * es,
                live=2 * tile, staged=0)


def _attention_bwd(c: _Call, held: str, streamed: str, dots: int, slots_written: int) -> Cost:
    """The dK/dV (held keys) or dQ (held queries) kernel: ``dots`` dots of (held x streamed x
    head_dim) per streamed block; reads q, k, v, dO, lse and delta once, writes its slots of dqkv."""
    B, N, H, dh, es = _attention_shape(c)
    held_block, streamed_block, bdh = c[held], c[streamed], c["BLOCK_DH"]
    n_blocks = math.ceil(N / streamed_block)
    scores = c.programs * held_block * n_blocks * streamed_block
    streamed_tile = 2 * streamed_block * bdh * es + 8 * streamed_block  # two operand tiles, lse and delta
    rows = B * N * H * dh
    return Cost(read=4 * rows * es + 8 * B * H * N, written=slots_written * rows * c.size("dqkv_ptr"),
                flops=2.0 * dots * scores * bdh, useful_flops=2.0 * dots * B * H * N * N * dh,
                kind=_dot_kind(c["qkv_ptr"].dtype, c["INPUT_PRECISION"]), sfu=scores,
                steps=1 + _pipelined_steps(n_blocks, c.stages), in_flight=streamed_tile * max(1, c.stages - 1),
                live=held_block * (2 * bdh + streamed_block) + 2 * held_block * bdh,
                staged=2 * held_block * bdh * es + streamed_tile * max(1, c.stages))


# The cost of every kernel, by the @triton.jit function's name; tests/test_perf_model.py checks that
# every kernel the workloads launch has one.
COSTS: dict[str, Callable[[_Call], Cost]] = {
    "add_layer_norm_kernel": _add_layer_norm,
    "add_layer_norm_backward_kernel": _add_layer_norm_backward,
    "fcu_down_kernel": _fcu_down,
    "pooled_projection_kernel": _pooled_projection,
    "layer_norm_gelu_backward_kernel": _layer_norm_gelu_backward,
    "avg_pool_backward_kernel": _avg_pool_backward,
    "fcu_up_expand_kernel": _fcu_up_expand,
    "fcu_up_expand_backward_kernel": _fcu_up_expand_backward,
    "bn_relu_add_upsampled_kernel": _bn_relu_add_upsampled,
    "bn_relu_add_upsampled_backward_kernel": _bn_relu_add_upsampled_backward,
    "attention_fwd_kernel": _attention_fwd,
    "attention_bwd_preprocess_kernel": _attention_bwd_preprocess,
    "attention_bwd_dkdv_kernel": lambda c: _attention_bwd(c, "BLOCK_N", "BLOCK_M", dots=4, slots_written=2),
    "attention_bwd_dq_kernel": lambda c: _attention_bwd(c, "BLOCK_M", "BLOCK_N", dots=3, slots_written=1),
}


# ------------------------------------------------------------------------- what the PyTorch ops move


def _add_layer_norm_torch(c: _Call) -> list[TorchOp]:
    M, D, es = c.programs, c["D"], c.size("x_ptr")
    rows = M * D * es
    return [TorchOp("x + y", 3 * rows), TorchOp("layer_norm", rows + M * D * c.size("out_ptr") + 8 * M, 8 * M * D)]


def _add_layer_norm_backward_torch(c: _Call) -> list[TorchOp]:
    M, D, es = c["M"], c["D"], c.size("s_ptr")
    rows = M * D * es
    ops = [TorchOp("layer_norm_backward (input)", 3 * rows + 8 * M, 12 * M * D),
           TorchOp("layer_norm_backward (weight, bias)", 2 * rows, 4 * M * D)]
    return ops + ([TorchOp("grad of the sum: + grad_sum", 3 * rows)] if c["HAS_GRAD_SUM"] else [])


def _squeeze_shape(c: _Call) -> tuple[int, int, int, int, int, int, int, int]:
    """(B, C, H * W, N, D, dw_stride, x2 element size, token element size) of a squeeze launch."""
    B, C, H, W = c["x_ptr"].shape
    return B, C, H * W, c["N"], c["D"], c["DW_STRIDE"], c["x_ptr"].element_size(), c.size("w_ptr")


def _fcu_down_torch(c: _Call) -> list[TorchOp]:
    B, C, HW, N, D, s, es, _ = _squeeze_shape(c)
    tok = c.size("out_ptr")
    tokens = B * N * D
    ops = [TorchOp("avg_pool2d", B * C * (HW + N) * es)] if s > 1 else []
    ops += [TorchOp("transpose copy (linear input)", 2 * B * N * C * es),
            TorchOp("linear", B * N * C * es + c.nbytes("w_ptr") + tokens * es, 2.0 * B * N * C * D,
                    _dot_kind(c["x_ptr"].dtype, c["DOT_PRECISION"])),
            TorchOp("layer_norm", tokens * (es + tok) + 8 * B * N, 8 * tokens),
            TorchOp("gelu", 2 * tokens * tok, 20 * tokens, sfu=tokens),
            TorchOp("cat (cls row)", (2 * tokens + 2 * B * D) * tok)]
    return ops + ([TorchOp("+ x_t", 3 * (tokens + B * D) * tok)] if c["ADD_X_T"] else [])


def _fcu_down_backward_torch(c: _Call) -> list[TorchOp]:
    B, C, HW, N, D, s, es, tok = _squeeze_shape(c)
    tokens = B * N * D
    ops = [TorchOp("gelu_backward", 3 * tokens * tok, 20 * tokens, sfu=2 * tokens),
           TorchOp("layer_norm_backward (input)", tokens * (2 * tok + es) + 8 * B * N, 12 * tokens),
           TorchOp("layer_norm_backward (weight, bias)", 2 * tokens * tok, 4 * tokens),
           TorchOp("linear bias grad", tokens * es),
           TorchOp("transpose copy backward", 2 * B * N * C * es)]
    return ops + ([TorchOp("avg_pool2d_backward", B * C * (HW + N) * es)] if s > 1 else [])


def _fcu_up_expand_torch(c: _Call) -> list[TorchOp]:
    tok = c["tok_ptr"]
    B, N, C, D, es = tok.shape[0], c["N"], c["C"], c["D"], tok.element_size()
    T = B * (1 + N)
    ops = [TorchOp("x_t.to(float32)", T * D * (es + 4))] if es != 4 else []
    return ops + [TorchOp("linear (fp32)", 4 * (T * D + C * D + T * C), 2.0 * T * C * D,
                          _dot_kind(torch.float32, c["DOT_PRECISION"])),
                  TorchOp("addcmul", 8 * B * N * C), TorchOp("relu_", 8 * B * N * C)] + (
        [TorchOp(".to(dtype)", B * N * C * (4 + es))] if es != 4 else [])


def _fcu_up_expand_backward_torch(c: _Call) -> list[TorchOp]:
    g = c["grad_ptr"]
    B, N, C, D, es = g.shape[0], c["N"], c["C"], c["D"], g.element_size()
    T = B * (1 + N)
    ops = [TorchOp(".to backward", B * N * C * (es + 4))] if es != 4 else []
    ops += [TorchOp("relu backward", 12 * B * N * C), TorchOp("addcmul backward (x scale)", 8 * B * N * C),
            TorchOp("slice backward (zeros + copy)", 4 * T * C + 8 * B * N * C),
            TorchOp("linear backward (input, fp32)", 4 * (T * C + C * D + T * D), 2.0 * T * C * D,
                    _dot_kind(torch.float32, c["DOT_PRECISION"]))]
    return ops + ([TorchOp("x_t.to backward", T * D * (4 + es))] if es != 4 else [])


def _bn_relu_add_upsampled_torch(c: _Call) -> list[TorchOp]:
    full, es = c["ROWS"] * c["COLS"], c.size("x_ptr")
    low = full // (c["up"] * c["up"])
    return [TorchOp("batch_norm", 2 * full * es), TorchOp("relu_", 2 * full * es),
            TorchOp("+ upsampled low", (2 * full + low) * es)]


def _bn_relu_add_upsampled_backward_torch(c: _Call) -> list[TorchOp]:
    low, es, up = c["ROWS"] * c["COLS"], c.size("x_ptr"), c["up"]
    full = low * up * up
    ops = [TorchOp("avg_pool2d (grad low)", (full + low) * es)] if up > 1 else []
    return ops + [TorchOp("relu backward", 3 * full * es),
                  TorchOp("batch_norm_backward", 5 * full * es)]


def _attention_torch(c: _Call) -> list[TorchOp]:
    B, N, H, dh, es = _attention_shape(c)
    rows = B * N * H * dh
    kind = _dot_kind(c["qkv_ptr"].dtype, c["INPUT_PRECISION"])
    return [TorchOp("scaled_dot_product_attention", 4 * rows * es + 4 * B * H * N, 4.0 * B * H * N * N * dh, kind,
                    sfu=B * H * N * N),
            TorchOp("transpose(1, 2).reshape copy", 2 * rows * es)]


def _attention_backward_torch(c: _Call) -> list[TorchOp]:
    out = c["out_ptr"]
    B, N, H, dh, es = out.shape[0], c["N"], c["H"], c["head_dim"], out.element_size()
    rows = B * N * H * dh
    kind = "fp16/bf16" if out.dtype != torch.float32 else "fp32"
    return [TorchOp("reshape/transpose backward copy", 2 * rows * es),
            TorchOp("sdpa backward: delta", 2 * rows * es + 4 * B * H * N),
            TorchOp("sdpa backward", 7 * rows * es + 8 * B * H * N + 3 * rows * 4, 10.0 * B * H * N * N * dh, kind,
                    sfu=B * H * N * N),
            TorchOp("stack dq, dk, dv into the qkv layout", 6 * rows * es)]


@dataclasses.dataclass(frozen=True)
class _Op:
    """A fused op call: the kernels it launches, in order, and the PyTorch ops it replaces (from
    its first launch's arguments). The GEMMs a backward op leaves to torch.matmul run in both
    paths and are in neither."""

    name: str
    kernels: tuple[str, ...]
    torch_ops: Callable[[_Call], list[TorchOp]]


_OPS = (
    _Op("add_layer_norm", ("add_layer_norm_kernel",), _add_layer_norm_torch),
    _Op("add_layer_norm backward", ("add_layer_norm_backward_kernel",), _add_layer_norm_backward_torch),
    _Op("fcu_down", ("fcu_down_kernel",), _fcu_down_torch),
    _Op("fcu_down backward", ("pooled_projection_kernel", "layer_norm_gelu_backward_kernel",
                              "avg_pool_backward_kernel"), _fcu_down_backward_torch),
    _Op("fcu_up_expand", ("fcu_up_expand_kernel",), _fcu_up_expand_torch),
    _Op("fcu_up_expand backward", ("fcu_up_expand_backward_kernel",), _fcu_up_expand_backward_torch),
    _Op("bn_relu_add_upsampled", ("bn_relu_add_upsampled_kernel",), _bn_relu_add_upsampled_torch),
    _Op("bn_relu_add_upsampled backward", ("bn_relu_add_upsampled_backward_kernel",),
        _bn_relu_add_upsampled_backward_torch),
    _Op("attention", ("attention_fwd_kernel",), _attention_torch),
    _Op("attention backward", ("attention_bwd_preprocess_kernel", "attention_bwd_dkdv_kernel",
                               "attention_bwd_dq_kernel"), _attention_backward_torch),
)
_OP_OF_FIRST_KERNEL = {op.kernels[0]: op for op in _OPS}
# Every kernel's op, for the table (tests check that COSTS and the ops name the same kernels).
TORCH_BASELINES = {kernel: op.name for op in _OPS for kernel in op.kernels}


def torch_seconds(ops: Iterable[TorchOp], device: Device = H100) -> float:
    """The unfused sequence's time if every op ran at its own roofline (no latency, no launch gaps)."""
    return sum(max(op.bytes / device.hbm_bytes_per_s, op.flops / device.peak_flops[op.kind],
                   op.sfu / device.sfu_per_s) for op in ops)


# ------------------------------------------------------------------------------------------ prediction


@dataclasses.dataclass(frozen=True)
class Resources:
    """Registers per thread and shared memory per CTA of a launch, from the sm_90 build (``source``
    "sm_90") or estimated from the cost (``source`` "estimate"); uses_wgmma None when unknown."""

    registers: int
    shared: int
    source: str
    uses_wgmma: bool | None = None


def estimate_resources(cost: Cost, num_warps: int) -> Resources:
    """Without a build: 32 registers of addresses and indices plus the live values per thread
    (rounded up to 8, at most 255), and the dot operands' staging buffers in shared memory."""
    registers = min(255, 8 * math.ceil((32 + math.ceil(cost.live / (32 * num_warps))) / 8))
    return Resources(registers, cost.staged, "estimate")


def occupancy(num_warps: int, registers: int, shared: int, device: Device = H100) -> tuple[int, str]:
    """(CTAs per SM, what limits it): warps, registers (allocated per warp in units of 256), shared
    memory (plus the per-CTA reservation) or the CTA slots."""
    regs_per_warp = math.ceil(registers * 32 / 256) * 256
    limits = {"warps": device.max_warps_per_sm // num_warps,
              "registers": device.regs_per_sm // (regs_per_warp * num_warps),
              "shared": device.smem_per_sm // (shared + device.smem_reserved_per_cta),
              "CTA slots": device.max_ctas_per_sm}
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The model's verdict on one launch."""

    kernel: str  # the @triton.jit function's name
    config: str  # the compile matrix's spec name
    shape: str  # of the launch's first tensor argument, e.g. "64x64x56x56"
    cost: Cost
    resources: Resources
    programs: int
    ctas_per_sm: int
    limiter: str
    waves: float  # programs / (SMs x CTAs per SM)
    in_flight_per_sm: int  # bytes: resident CTAs x bytes in flight per program
    memory_s: float
    compute_s: float
    latency_s: float

    @property
    def seconds(self) -> float:
        return max(self.memory_s, self.compute_s, self.latency_s)

    @property
    def bound(self) -> str:
        terms = {"HBM": self.memory_s, "compute": self.compute_s, "latency": self.latency_s}
        return max(terms, key=terms.get)


def predict(launch: Launch, resources: Resources | None = None, device: Device = H100) -> Prediction:
    """The model's time for one recorded launch, with ``resources`` from a build (else estimated)."""
    call = _Call(launch)
    cost = COSTS[call.name](call)
    resources = resources or estimate_resources(cost, call.warps)
    ctas, limiter = occupancy(call.warps, resources.registers, resources.shared, device)
    busiest = math.ceil(call.programs / device.sms)  # programs on the busiest SM
    rounds = math.ceil(busiest / ctas)
    peak = device.peak_flops[cost.kind]
    if cost.kind != "fp32" and resources.uses_wgmma is False:
        peak *= device.mma_sync_fraction
    per_program = device.sms / call.programs
    compute = busiest * per_program * (cost.flops / peak + cost.sfu / device.sfu_per_s)
    first = next(a for a in launch.args if isinstance(a, torch.Tensor))
    return Prediction(kernel=call.name, config=spec_of(launch).name, shape="x".join(map(str, first.shape)),
                      cost=cost, resources=resources,
                      programs=call.programs, ctas_per_sm=ctas, limiter=limiter,
                      waves=call.programs / (device.sms * ctas), in_flight_per_sm=min(ctas, busiest) * cost.in_flight,
                      memory_s=cost.bytes / device.hbm_bytes_per_s, compute_s=compute,
                      latency_s=rounds * cost.steps * device.dram_latency_s)


def _resources(made: Iterable[Launch], build: bool, jobs: int | None) -> dict[str, Resources]:
    """{spec name: Resources} of the sm_90 builds of the launches (empty without ``build``)."""
    if not build:
        return {}
    specs = {}
    for launch in made:
        spec = spec_of(launch)
        specs.setdefault(spec.name, spec)
    reports = compile_specs_for(specs.values(), (90,), jobs)
    return {r.name: Resources(r.registers, r.shared_bytes, "sm_90", r.uses_wgmma) for r in reports}


def predictions(made: Iterable[Launch], build: bool = False, jobs: int | None = None) -> list[Prediction]:
    """:func:`predict` for each launch, with the sm_90 builds' resources when ``build``."""
    made = list(made)
    built = _resources(made, build, jobs)
    return [predict(launch, built.get(spec_of(launch).name)) for launch in made]


def predict_call(fn: Callable, *args, build: bool = False, **kwargs) -> list[Prediction]:
    """The predictions of the launches ``fn(*args, **kwargs)`` makes (a kernel module's ``*_triton``
    entry or ``*_op``), run inside :func:`record_launches`: nothing launches, the outputs are only
    allocated; meta tensors work where the entry needs no autocast state."""
    with record_launches() as made, torch.no_grad():
        fn(*args, **kwargs)
    return predictions(made, build=build and compiles_natively())


@dataclasses.dataclass(frozen=True)
class OpCall:
    """One fused op call of a workload: its kernels' predictions and the PyTorch ops it replaces."""

    name: str
    predictions: tuple[Prediction, ...]
    torch_ops: tuple[TorchOp, ...]

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.predictions)

    @property
    def bytes(self) -> int:
        return sum(p.cost.bytes for p in self.predictions)


def op_calls(made: list[Launch], predicted: list[Prediction]) -> list[OpCall]:
    """The launches grouped into fused op calls (a call starts at its op's first kernel)."""
    calls: list[tuple[_Op, _Call, list[Prediction]]] = []
    for launch, p in zip(made, predicted):
        op = _OP_OF_FIRST_KERNEL.get(p.kernel)
        if op is not None:
            calls.append((op, _Call(launch), []))
        calls[-1][2].append(p)
    return [OpCall(op.name, tuple(ps), tuple(op.torch_ops(first))) for op, first, ps in calls]


# ---------------------------------------------------------------------------------------------- tables


def _pick(model: str, size: tuple[int, int], batch: int, precision: str, mode: str) -> Workload:
    return next(w for w in WORKLOADS if (w.model, (w.height, w.width), w.batch, w.precision, w.channels_last,
                                         w.mode) == (model, size, batch, precision, True, mode))


# The workloads --model prints without --workload: Conformer-S at 224, batch 64, bf16 on H100 (the
# headline, PERF_MODEL.md's table; inference and a training step, and the training step under
# autocast), Conformer-Ti and -B likewise, and the detection backbone (Conformer-S/32 at 800x1344).
HEADLINE = (_pick("conformer_small_patch16", (224, 224), 64, "bf16", "eval"),
            _pick("conformer_small_patch16", (224, 224), 64, "bf16", "train"),
            _pick("conformer_small_patch16", (224, 224), 64, "amp-bf16", "train"),
            _pick("conformer_tiny_patch16", (224, 224), 64, "bf16", "eval"),
            _pick("conformer_tiny_patch16", (224, 224), 64, "bf16", "train"),
            _pick("conformer_base_patch16", (224, 224), 64, "bf16", "eval"),
            _pick("conformer_base_patch16", (224, 224), 64, "bf16", "train"),
            _pick("conformer_small_patch32", (800, 1344), 1, "bf16", "eval"))


def _label(p: Prediction) -> str:
    """The spec name without its specialisation field: kernel[pointer dtypes,constexprs,warps+stages]."""
    return p.config.rpartition(",")[0] + "]"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def table(workload: Workload, predicted: list[Prediction], calls: list[OpCall]) -> str:
    """Markdown: one row per distinct kernel launch, then one per distinct fused op call against the
    PyTorch ops it replaces (times in µs on the model's H100)."""
    lines = [f"### {workload}", "",
             "| kernel launch | first tensor | programs | MB | GFLOP (useful) | regs / smem (src) | CTAs/SM (limit) | "
             "waves | KiB in flight/SM | HBM µs | compute µs | latency µs | predicted µs | bound |",
             "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    seen = set()
    for p in predicted:
        r, c = p.resources, p.cost
        row = (f"| {_label(p)} | {p.shape} | {p.programs} | {c.bytes / 1e6:.2f} | {c.flops / 1e9:.2f} "
               f"({c.useful_flops / max(c.flops, 1) * 100:.0f}%) | {r.registers} / {r.shared / 1024:.0f} KiB "
               f"({r.source}) | {p.ctas_per_sm} ({p.limiter}) | {p.waves:.2f} | {p.in_flight_per_sm / 1024:.1f} | "
               f"{_us(p.memory_s)} | {_us(p.compute_s)} | {_us(p.latency_s)} | **{_us(p.seconds)}** | {p.bound} |")
        if row not in seen:
            seen.add(row)
            lines.append(row)
    lines += ["", "| fused op call | kernels | MB | predicted µs | PyTorch ops | PyTorch MB | "
              "PyTorch µs (roofline) | speedup |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    seen = set()
    for call in calls:
        torch_s = torch_seconds(call.torch_ops)
        torch_mb = sum(op.bytes for op in call.torch_ops) / 1e6
        row = (f"| {call.name} | {len(call.predictions)} | {call.bytes / 1e6:.2f} | {_us(call.seconds)} | "
               f"{len(call.torch_ops)} | {torch_mb:.2f} | {_us(torch_s)} | {torch_s / call.seconds:.2f}x |")
        if row not in seen:
            seen.add(row)
            lines.append(row)
    return "\n".join(lines)


def model_report(workloads: Iterable[Workload], build: bool, jobs: int | None = None) -> str:
    """The tables of ``workloads``, with the sm_90 builds' registers and shared memory when ``build``."""
    workloads = list(workloads)
    made = {w: launches(w) for w in workloads}
    built = _resources([launch for w in workloads for launch in made[w]], build, jobs)
    out = [f"Model: {H100.name}, HBM {H100.hbm_bytes_per_s / 1e12:.2f} TB/s, DRAM latency "
           f"{H100.dram_latency_s * 1e9:.0f} ns ({H100.in_flight_needed / 1024:.1f} KiB in flight per SM for full "
           f"bandwidth), {H100.sms} SMs; triton {triton.__version__}, "
           f"{'registers and shared memory from the sm_90 builds' if build else 'estimated resources (no build)'}."]
    for w in workloads:
        predicted = [predict(launch, built.get(spec_of(launch).name)) for launch in made[w]]
        out += ["", table(w, predicted, op_calls(made[w], predicted))]
    return "\n".join(out)


def _workload(text: str) -> Workload:
    for w in WORKLOADS:
        if str(w) == text:
            return w
    raise argparse.ArgumentTypeError(f"unknown workload {text!r}: expected one of compile_matrix.WORKLOADS as "
                                     f"printed, e.g. {str(HEADLINE[0])!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastconformer.kernels --model", description=(
        "The performance model: per kernel launch of real workloads, bytes, FLOPs, programs, waves, "
        "occupancy and predicted H100 time, next to the PyTorch ops each fused op replaces."))
    parser.add_argument("--model", action="store_true", required=True, help="print the performance model")
    parser.add_argument("--workload", type=_workload, action="append", default=None,
                        help=f"a workload as printed (repeatable; default: {len(HEADLINE)} headline workloads), "
                             f"e.g. {str(HEADLINE[0])!r}")
    parser.add_argument("--no-build", action="store_true",
                        help="estimate registers and shared memory instead of building for sm_90")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    args = parser.parse_args(argv)
    build = not args.no_build and compiles_natively()
    print(model_report(args.workload or HEADLINE, build, args.jobs))
