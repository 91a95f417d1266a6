"""The compile matrix: every registered Triton kernel and launch config, built for sm_80 and sm_90
with no GPU present. Registers, shared memory and spills are printed (run with -s); spills fail."""

import pytest

pytest.importorskip("triton")

from fastconformer.kernels import all_compile_specs, compile_matrix  # noqa: E402

ARCHES = (80, 90)
SPECS = list(all_compile_specs())


@pytest.fixture(scope="session")
def reports():
    return compile_matrix(ARCHES)


@pytest.mark.compile
@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_compiles_without_spills(reports, spec, arch):
    report = reports[(spec.name, arch)]
    print(f"sm_{arch} {spec.name}: {report.registers} regs, {report.shared_bytes} B shared, "
          f"{report.spill_bytes} B spilled, wgmma={report.uses_wgmma}")
    assert report.registers > 0
    assert report.spill_bytes == 0, f"{spec.name} spills {report.spill_bytes} bytes on sm_{arch}"
