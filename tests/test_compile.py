"""The compile matrix: the Triton kernel variants the launchers launch for the real workloads, built
for sm_80 and sm_90 with no GPU present. The suite builds the "sample" scope (every kernel in every
pointer-dtype combination it is launched with, fp16 and bf16 one class, at its first launch config); ``--compile-scope
configs`` builds one variant per launch config (every tile shape; ``python -m fastconformer.kernels``
does the same outside pytest, ``--all`` every specialisation). Registers, shared memory and spills
are printed (run with -n0 -s); spills fail. Also: the specs are derived from what the launchers launch,
through Triton's own launch-time specialisation, with the kernels' own argument names."""

import dataclasses
import importlib
import inspect
import json

import pytest
import torch

pytest.importorskip("triton")

from fastconformer.kernels import KERNEL_MODULES, LaunchConfig, attention, compile_matrix, fcu_down  # noqa: E402
from fastconformer.kernels import record_launches  # noqa: E402
from fastconformer.kernels.compile_matrix import (SCOPES, WORKLOADS, CompileSpec, dtype_class, in_scope,  # noqa: E402
                                                  spec_of)
from fastconformer.registry import VARIANTS  # noqa: E402

ARCHES = (80, 90)
# Every @triton.jit kernel of the package, "module:function" (cheap: the specs, derived from 972
# workloads, are computed once, by the fixtures below, not at collection in every xdist worker).
KERNELS = sorted(f"fastconformer.kernels.{m}:{name}" for m in KERNEL_MODULES
                 for name, obj in vars(importlib.import_module(f"fastconformer.kernels.{m}")).items()
                 if name.endswith("_kernel") and hasattr(obj, "fn"))


@pytest.fixture(scope="session")
def reports(pytestconfig, once_per_run, all_specs):
    scope = pytestconfig.getoption("compile_scope")
    return once_per_run(f"compile_matrix_{scope}",
                        lambda: compile_matrix.compile_matrix(ARCHES, specs=in_scope(all_specs, scope)))


@pytest.mark.compile
def test_compiles_without_spills(reports):
    """Every variant in the --compile-scope builds for sm_80 and sm_90 without spills; every kernel
    has variants for both. One test (not one per kernel): under pytest-xdist a single worker waits
    for the build while the others go on testing."""
    for r in reports.values():
        print(f"sm_{r.arch} {r.name}: {r.registers} regs, {r.shared_bytes} B shared, {r.spill_bytes} B spilled, "
              f"wgmma={r.uses_wgmma}")
    built = {(r.name.partition("[")[0] + "_kernel", r.arch) for r in reports.values()}
    missing = [f"{kernel} sm_{arch}" for kernel in KERNELS for arch in ARCHES
               if (kernel.rpartition(":")[2], arch) not in built]
    assert not missing, f"the compile matrix built no variant of: {', '.join(missing)}"
    spilling = sorted(f"sm_{r.arch} {r.name}: {r.spill_bytes} B" for r in reports.values() if r.spill_bytes)
    assert not spilling, f"{len(spilling)} of {len(reports)} builds spill:\n" + "\n".join(spilling)


def _jit(spec):
    module, _, name = spec.kernel.partition(":")
    fn = getattr(importlib.import_module(module), name)
    return getattr(fn, "fn", fn)  # the Python function (an InterpretedFunction under TRITON_INTERPRET keeps it in .fn)


def test_signatures_are_the_kernels_own(all_specs):
    """Each spec's signature names the kernel's parameters in order, constexpr exactly where the kernel
    declares one or Triton specialised an int equal to 1: renaming an argument cannot desync them."""
    for spec in all_specs:
        params = inspect.signature(_jit(spec)).parameters
        assert list(spec.signature) == list(params), spec.name
        for name, kind in spec.signature.items():
            declared = "constexpr" in str(params[name].annotation)
            assert (kind == "constexpr") == (declared or spec.constexprs.get(name) == 1), (spec.name, name)


def test_launcher_and_spec_must_agree_on_constexprs():
    """A LaunchConfig that does not set exactly the kernel's constexprs is an error, not a silent spec."""
    launch = compile_matrix.launches(WORKLOADS[0])[0]
    wrong = dataclasses.replace(launch, config=LaunchConfig({**launch.config.constexprs, "BLOCK_X": 1},
                                                           launch.config.num_warps, launch.config.num_stages))
    with pytest.raises(RuntimeError, match="constexprs"):
        spec_of(wrong)


def test_attention_forward_builds_the_launchers_config(all_specs):
    """The suite builds the forward exactly as its launcher runs it at Conformer's head_dim 64 in
    fp16/bf16 (64-query tiles, 4 warps, 3 stages; 32-key blocks at N = 197, 64 at N = 50, 1051 and
    4201), not with the backward's tiles."""
    chosen = attention.attention_fwd_config(197, 64, torch.float16, "ieee")
    assert (chosen.constexprs["BLOCK_M"], chosen.constexprs["BLOCK_N"], chosen.num_warps, chosen.num_stages) == (
        64, 32, 4, 3)
    forwards = [s for s in all_specs if s.scope != "all" and s.kernel.endswith(":attention_fwd_kernel")
                and s.signature["qkv_ptr"] == "*fp16"
                and s.constexprs["BLOCK_DH"] == 64]
    assert sorted((s.constexprs["BLOCK_M"], s.constexprs["BLOCK_N"], s.num_warps, s.num_stages) for s in forwards) == [
        (64, 32, 4, 3), (64, 64, 4, 3)]


def _squeeze_launches(dw_stride, layout, add_x_t=True, dtype=torch.float32, B=3, H=28, D=384):
    """The kernel launches of the fcu_down forward and backward for a (B, 64, H, H) x2 at
    ``dw_stride`` in ``layout``: [forward, recompute, LayerNorm-GELU backward, pool adjoint]."""
    x2 = torch.empty(B, 64, H, H, dtype=dtype, device="meta", memory_format=layout)
    n = (H // dw_stride) ** 2
    x_t, weight, vec = (torch.empty(B, 1 + n, D, dtype=dtype, device="meta"),
                        torch.empty(D, 64, dtype=dtype, device="meta"), torch.empty(D, dtype=dtype, device="meta"))
    with record_launches() as launches:
        fcu_down.fcu_down_op(x2, x_t, weight, vec, vec, vec, dw_stride, 1e-6, add_x_t)
        fcu_down.fcu_down_backward_op(x_t, x2, weight, vec, vec, vec, dw_stride, 1e-6)
    return launches


def test_specs_carry_the_launch_time_specialisation():
    """Ints equal to 1 become constants (the unit channel stride), multiples of 16 and fresh
    pointers get divisibility hints, others neither; as Triton does at launch. dw_stride and
    add_x_t are constexprs of the launcher's config (the window loop unrolls, the + x_t compiles
    away)."""
    spec = spec_of(_squeeze_launches(1, torch.channels_last)[0])
    assert spec.signature["stride_xc"] == "constexpr" and spec.constexprs["stride_xc"] == 1
    assert spec.constexprs["DW_STRIDE"] == 1 and spec.constexprs["ADD_X_T"] is True
    assert {"x_ptr", "out_ptr", "N", "C", "D", "stride_xb", "stride_xw"} <= set(spec.attrs)  # N = 28 * 28
    assert spec.signature["n_w"] == "i32" and "n_w" not in spec.attrs  # 28
    assert spec.signature["eps"] == "fp32" and "eps" not in spec.attrs
    strided = spec_of(_squeeze_launches(2, torch.channels_last, add_x_t=False)[0])
    assert strided.constexprs["DW_STRIDE"] == 2 and strided.constexprs["ADD_X_T"] is False
    assert strided.name != spec.name


@pytest.mark.parametrize("dw_stride", [1, 2, 4, 8])
def test_squeeze_reads_nchw_x2_channels_last(dw_stride):
    """An NCHW x2 (channels strided) reaches the forward and the backward's recompute as a
    channels_last copy, so they launch exactly the channels_last variants (the gathered NCHW loads
    spilled, kernels/COMPILE_MATRIX.md), while the pool adjoint writes grad x2 in x2's own layout."""
    specs = {layout: [spec_of(launch) for launch in _squeeze_launches(dw_stride, layout, dtype=torch.float16, B=64,
                                                                      H=56)]
             for layout in (torch.channels_last, torch.contiguous_format)}
    (nhwc_forward, nhwc_recompute, *_, nhwc_pool), (forward, recompute, *_, pool) = specs.values()
    assert (forward.name, recompute.name) == (nhwc_forward.name, nhwc_recompute.name)
    assert forward.constexprs["stride_xc"] == recompute.constexprs["stride_xc"] == 1
    assert pool.constexprs["CHANNELS_LAST"] is False and nhwc_pool.constexprs["CHANNELS_LAST"] is True


@pytest.mark.parametrize("D, precision, x2_dtype, dw_stride, with_x_t, alone", [
    (384, "ieee", torch.float32, 2, (16, 2), (16, 2)), (576, "ieee", torch.float32, 1, (16, 2), (16, 2)),
    (576, "tf32", torch.float32, 1, (16, 2), (16, 1)), (256, "ieee", torch.float32, 4, (4, 2), (16, 1)),
    (256, "ieee", torch.bfloat16, 2, (4, 2), (16, 1)), (128, "ieee", torch.float16, 4, (4, 2), (16, 1)),
    (128, "ieee", torch.float16, 2, (4, 2), (4, 2)), (128, "tf32", torch.float32, 4, (4, 2), (4, 2)),
    (256, "ieee", torch.float32, 8, (8, 2), (8, 2)), (1024, "tf32", torch.float32, 1, (8, 2), (8, 2))])
def test_squeeze_config_with_and_without_x_t(D, precision, x2_dtype, dw_stride, with_x_t, alone):
    """(warps, stages) of the squeeze with fp32 tokens, with + x_t and without (the module alone:
    where ptxas spilled 8-16 B under one of triton 3.6-3.9, 16 warps and an unpipelined K loop)."""
    got = [fcu_down.fcu_down_config(D, x2_dtype, torch.float32, precision, dw_stride, add_x_t)
           for add_x_t in (True, False)]
    assert [(c.num_warps, c.num_stages) for c in got] == [with_x_t, alone]
    assert [c.constexprs["ADD_X_T"] for c in got] == [True, False]


def test_every_kernel_is_in_the_matrix(all_specs):
    assert set(KERNELS) == {s.kernel for s in all_specs if s.scope == "sample"}


def test_scopes_build_each_launch_config_and_each_dtype_combination_once(all_specs):
    """"configs" holds one spec per launch config (kernel, pointer dtypes, the launcher's constexprs,
    warps, stages) and set of arguments Triton specialised to 1 (a layout's unit stride), "sample" one
    per kernel and pointer dtypes (fp16 and bf16 one class), each scope inside the next."""
    configs, dtypes = {}, {}
    for spec in all_specs:
        declared = inspect.signature(_jit(spec)).parameters
        chosen = {k: v for k, v in spec.constexprs.items() if "constexpr" in str(declared[k].annotation)}
        ones = tuple(k for k in spec.constexprs if k not in chosen)
        pointers = tuple(t for t in spec.signature.values() if t.startswith("*"))
        configs.setdefault((spec.kernel, pointers, tuple(chosen.items()), spec.num_warps, spec.num_stages, ones),
                           []).append(spec.scope)
        dtypes.setdefault((spec.kernel, tuple(map(dtype_class, pointers))), []).append(spec.scope)
    assert all(scopes.count("sample") + scopes.count("configs") == 1 for scopes in configs.values())
    assert all(scopes.count("sample") == 1 for scopes in dtypes.values())
    assert [len(in_scope(all_specs, scope)) for scope in SCOPES] == [len(dtypes), len(configs), len(all_specs)]
    with pytest.raises(ValueError, match="scope"):
        in_scope(all_specs, "every")


def test_workloads_are_the_registered_variants():
    """Every published variant at 224 and at the detection size 800x1344, batch 1, 64 and 128, in every
    precision, layout and mode; the matrix's copy of their shapes is the registry's."""
    assert compile_matrix.VARIANTS == {name: {k: v.kwargs[k] for k in ("patch_size", "channel_ratio", "embed_dim",
                                                                       "num_heads")} for name, v in VARIANTS.items()}
    real = [w for w in WORKLOADS if w.model in VARIANTS]
    assert {w.model for w in real} == set(VARIANTS)
    assert {(w.height, w.width) for w in real} == {(224, 224), (800, 1344)}
    assert {w.batch for w in real} == {1, 64, 128}
    assert len(real) == len(VARIANTS) * 2 * 3 * len(compile_matrix.PRECISIONS) * 2 * len(compile_matrix.MODES)


def test_specs_round_trip_through_the_command_line(all_specs, tmp_path, capsys):
    """``--list`` prints specs as JSON that ``--specs FILE`` reads back unchanged (the suite's build
    child gets its specs that way); a file that is not such a list is a one-line usage error."""
    listed = tmp_path / "specs.json"
    listed.write_text(compile_matrix.specs_json(in_scope(all_specs, "sample")))
    compile_matrix.main(["--specs", str(listed), "--list"])
    assert [CompileSpec(**s) for s in json.loads(capsys.readouterr().out)] == in_scope(all_specs, "sample")
    listed.write_text('{"name": "fcu_down"}')
    with pytest.raises(SystemExit) as exit_:
        compile_matrix.main(["--specs", str(listed)])
    assert exit_.value.code == 2 and "not a JSON list of specs" in capsys.readouterr().err


@pytest.mark.parametrize("jobs", ["0", "-2"])
def test_jobs_below_one_is_a_usage_error(jobs, capsys):
    with pytest.raises(SystemExit) as exit_:
        compile_matrix.main(["--sample", "--list", "--jobs", jobs])
    assert exit_.value.code == 2 and f"--jobs: expected an integer >= 1, got {jobs}" in capsys.readouterr().err
