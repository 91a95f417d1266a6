"""fastconformer.keep_freed_memory: on glibc it takes, and eager CPU forwards of Conformer-S at
batch 8 (which fault in thousands of pages per forward with glibc's default settings) fault few
once warm; where another allocator serves malloc (a library preloaded through LD_PRELOAD) it
changes nothing and says so. Each case runs in its own process: the setting is process-wide."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import fastconformer
from fastconformer.malloc import _glibc

glibc_only = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc does not serve this process")

FORWARDS = textwrap.dedent("""
    import resource, torch, fastconformer
    from fastconformer.testing import reference_and_fast
    applied = fastconformer.keep_freed_memory()
    _, fast = reference_and_fast("conformer_small_patch16")
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for _ in range(3):  # the heap grows to what a forward needs
            fast.eval()(x)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            fast(x)
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _run(code: str, env: dict | None = None) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@glibc_only
def test_kept_memory_is_reused_by_warm_forwards():
    """Three warm forwards fault 37,000-47,000 pages under glibc's defaults here, 0-1,600 with the
    setting (the heap may still grow by a few MiB to fit a block between kept ones)."""
    applied, faults = _run(FORWARDS)
    assert applied == "True" and int(faults) < 4000


@glibc_only
def test_another_malloc_is_left_alone(tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a malloc that LD_PRELOAD puts before glibc's")
    source = tmp_path / "preloaded_malloc.c"
    source.write_text("#include <stddef.h>\nextern void *__libc_malloc(size_t);\n"
                      "void *malloc(size_t n) { return __libc_malloc(n); }\n")
    library = tmp_path / "preloaded_malloc.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    assert _run("import fastconformer; print(fastconformer.keep_freed_memory())",
                env={"LD_PRELOAD": str(library)}) == ["False"]


@pytest.mark.parametrize("threshold", [0, -1, 1, 4096, 128 * 2 ** 10 - 1, 2 ** 31, 1.5, True, "64"])
def test_wrong_thresholds(threshold):
    with pytest.raises(ValueError, match="mmap_threshold must be an int"):
        fastconformer.keep_freed_memory(threshold)
