"""fastconformer.keep_freed_memory: on glibc it takes, and eager CPU forwards after the first fault
no page in; where another allocator serves malloc (a library preloaded through LD_PRELOAD) it
changes nothing and says so. Each case runs in its own process: the setting is process-wide."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from fastconformer.malloc import _glibc

glibc_only = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc does not serve this process")

FORWARDS = textwrap.dedent("""
    import resource, sys, torch, fastconformer
    from fastconformer.testing import reference_and_fast
    applied = fastconformer.keep_freed_memory() if sys.argv[1] == "keep" else None
    _, fast = reference_and_fast("conformer_tiny_patch16", depth=3)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        fast.eval()(x)
        torch.empty(2 ** 25).fill_(1.0)  # a 128 MiB block, beyond glibc's largest adaptive mmap threshold
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            fast(x)
            torch.empty(2 ** 25).fill_(1.0)
    print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _run(code: str, *args: str, env: dict | None = None) -> list[str]:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@glibc_only
def test_kept_memory_faults_no_page_in_later_forwards():
    assert int(_run(FORWARDS, "default")[1]) > 3 * 2 ** 25 * 4 // os.sysconf("SC_PAGE_SIZE") // 2  # mapped afresh
    applied, faults = _run(FORWARDS, "keep")
    assert applied == "True"
    assert int(faults) < 100  # three forwards and blocks: tens of thousands of pages, had any gone back


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
