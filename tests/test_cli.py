"""The command line, end to end at small sizes, and its error contract: wrong input gives one
``error:`` line on stderr and a non-zero exit status, never a traceback."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from PIL import Image

import fastconformer
from fastconformer import cli, dispatch
from fastconformer.cli import main
from fastconformer.testing import reference_and_fast, saved_activation_bytes, to_float64
from fastconformer.timing import Timing
from fastconformer.validation import CHECKS


def run(argv, capsys):
    """(exit status, stdout, stderr) of the command line, the way the console script ends."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": fastconformer.create_model("conformer_tiny_patch16").state_dict()}, path)
    return path


@pytest.fixture
def photo(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    path = tmp_path / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(path)
    return path


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "conformer_base_patch16" in out and "83,289,136" in out


def test_bench_writes_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    status, out, err = run(["bench", "--model", "conformer_tiny_patch16", "--batch-size", "1", "--image-size", "64",
                            "--iters", "1", "--min-seconds", "0", "--device", "cpu", "--json", str(path)], capsys)
    assert status == 0
    assert "images/s" in out and "spread" in out and "fast" in out
    assert "warning: only 1 round(s): too few to judge the spread" in out
    assert "warm-up" in err and "round 1" in err  # progress feedback
    result = json.loads(path.read_text())
    assert result["rounds"] == 1 and result["warnings"]
    assert [r["impl"] for r in result["results"]] == ["reference", "fast"]
    reference, fast = result["results"]
    assert 0 < reference["rel_error_vs_float64"] < 1e-4  # its own fp32 error, not a comparison with itself
    assert 0 < fast["rel_error_vs_float64"] < 1e-4
    assert len(fast["seconds"]) == 1 and fast["spread"] == 0.0 and len(fast["warmup_seconds"]) >= 3


@pytest.mark.parametrize("took", [True, False])
def test_bench_keeps_freed_memory_when_asked_and_says_so(took, tmp_path, monkeypatch, capsys):
    """--keep-freed-memory calls keep_freed_memory() once before building (a fake here: the real
    one changes this process's allocator for good; tests/test_malloc.py runs it in subprocesses);
    the header and JSON name the settings timed, and a refusal is a warning, not an error."""
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or took)
    path = tmp_path / "bench.json"
    argv = ["bench", "--model", "conformer_tiny_patch16", "--batch-size", "1", "--image-size", "64", "--iters", "1",
            "--min-seconds", "0", "--device", "cpu", "--json", str(path)]
    status, out, _ = run(argv + ["--keep-freed-memory"], capsys)
    malloc = "keep_freed_memory()" if took else "keep_freed_memory() returned False"
    assert status == 0 and calls == [1] and json.loads(path.read_text())["malloc"] == malloc
    assert f"; malloc: {malloc}; environment: " in out.splitlines()[0]
    assert ("warning: --keep-freed-memory: keep_freed_memory() returned False" in out) is not took
    status, out, _ = run(argv, capsys)
    assert status == 0 and calls == [1] and json.loads(path.read_text())["malloc"] == "process defaults"


def test_bench_reports_medians_and_warns_on_a_wide_spread(tmp_path, capsys, fake_clock):
    """The speed-up is the ratio of the medians; an interquartile range above SPREAD_LIMIT of the
    median is flagged (reference rounds 1.0 .. 1.5 s here, quartiles 1.0 and 1.375: 30%)."""
    reference_rounds = [1.0, 1.25, 1.5, 1.0, 1.375]
    fast_rounds = [0.5, 0.5, 0.5, 0.515625, 0.5]
    fake_clock([1.0] * 3 + [0.5] * 3 + [t for pair in zip(reference_rounds, fast_rounds) for t in pair])
    path = tmp_path / "bench.json"
    status, out, _ = run(["bench", "--model", "conformer_tiny_patch16", "--batch-size", "1", "--image-size", "64",
                          "--iters", "5", "--min-seconds", "0", "--device", "cpu", "--json", str(path)], capsys)
    assert status == 0
    reference, fast = json.loads(path.read_text())["results"]
    assert reference["seconds_per_batch"] == 1.25 and fast["seconds_per_batch"] == 0.5
    assert fast["speedup"] == 2.5 and "2.50x" in out
    assert reference["spread"] == 0.3 and fast["spread"] == 0.0
    assert "warning: timing spread (interquartile range / median) above 5%: reference 30.0%;" in out


def test_check_default_run_passes():
    """The real default ``fastconformer check`` as a user on a CPU machine runs it (a fresh process
    without TRITON_INTERPRET): every check on the torch backend, in float32 and float16. The expand
    row failed before (to_float64 called .detach() on its ints H and W). The Triton rows of the same
    checks run under the interpreter in :func:`test_check_runs_the_triton_rows_under_the_interpreter`
    and, for every module and the whole model, in the module test files."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", "import sys; from fastconformer.cli import main; "
                           "sys.exit(main(['check', '--device', 'cpu']))"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.endswith("  pass")]
    cpu = torch.device("cpu")  # a check that does not apply here is a "not run" row
    ran = [c for c in CHECKS if c.not_here(cpu) is None]
    assert len(rows) == sum(len(c.dtypes) if c.dtypes else 2 for c in ran)
    assert {row.split()[-5] for row in rows} == {"torch"}
    not_run = [line for line in proc.stdout.splitlines() if " not run: " in line]
    assert sorted(line.split("  ")[0] for line in not_run) == sorted(c.name for c in CHECKS if c not in ran)
    assert "FAIL" not in proc.stdout and proc.stdout.rstrip().endswith("all checks passed")


@pytest.mark.skipif(not (dispatch.triton_available() and dispatch.interpreter_enabled()),
                    reason="the Triton rows run on the CPU only under TRITON_INTERPRET=1")
def test_check_runs_the_triton_rows_under_the_interpreter(capsys):
    """The squeeze's and the expand's checks on both backends, float32 and float16, through the
    command line in this interpreter-enabled process: the command's Triton rows work. (Each module's
    Triton run, at these shapes and others, is its test file's; the whole model's is
    tests/test_fast_model.py's.)"""
    modules = [c for c in CHECKS if c.name.startswith(("squeeze", "expand"))]
    for check in modules:
        assert main(["check", "--device", "cpu", "--only", check.name]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.endswith("  pass")]
    assert len(rows) == len(modules) * 2 * 2
    assert {row.split()[-5] for row in rows} == {"torch", "triton"}
    assert "FAIL" not in out


def test_check_reports_a_pass_table(capsys):
    assert main(["check", "--device", "cpu", "--only", "expand"]) == 0
    out = capsys.readouterr().out
    assert "expand (FCUUp, S block 2)" in out and "all checks passed" in out and "FAIL" not in out


def test_check_says_which_checks_do_not_run_here(monkeypatch, capsys):
    """A serving path this torch lacks is a "not run" row with the reason, not a failure."""
    from fastconformer import validation

    monkeypatch.setattr(validation, "onednn_graph_available", lambda: False)
    status, out, _ = run(["check", "--device", "cpu", "--only", "whole model,"], capsys)
    assert status == 0 and "not run: this torch has no oneDNN Graph fuser" in out
    assert out.rstrip().endswith("all checks passed")  # the prepacked row ran
    with dispatch.onednn(False):
        status, out, _ = run(["check", "--device", "cpu", "--only", "whole model,"], capsys)
    assert status == 0 and out.count("not run: oneDNN is switched off") == 4
    assert out.rstrip().endswith("no check runs here")
    results = list(validation.run_checks(validation.select_checks("prepacked"), torch.device("cuda"),
                                         (torch.float32,), ("torch",)))
    assert [(r.not_run, r.passed, r.failed) for r in results] == [("a CPU serving path (--device cpu)", False, False)]


def test_serving_checks_fail_when_the_eager_model_ran():
    """The serving checks judge their paths: a call their gates refuse (autograd on) is an error."""
    from fastconformer.validation import _MustServe, _ungraphed, _unpacked

    _, fast = reference_and_fast("conformer_tiny_patch16", depth=3)
    x = torch.randn(1, 3, 224, 224)
    with pytest.raises(RuntimeError, match="no oneDNN graph served the call"):
        _MustServe(fastconformer.onednn_graph(fast.eval()), _ungraphed)(x)
    with pytest.raises(RuntimeError, match="the model read no packed weight"):
        _MustServe(fastconformer.prepack_weights(fast), _unpacked)(x)


def test_testing_helpers_take_non_tensor_inputs():
    """The helpers check feeds a module's inputs through pass non-tensors along (FCUUp takes H, W)."""
    x = torch.randn(2, 3, requires_grad=True)
    assert to_float64((x, 14, None))[1:] == (14, None) and to_float64(x).dtype == torch.float64

    class Scaled(nn.Module):
        def forward(self, scale, x):
            return x.sin() * scale

    assert saved_activation_bytes(Scaled(), 2.0, x) == x.untyped_storage().nbytes()  # sin saves its input


@pytest.mark.parametrize("argv, message", [
    (["bench", "--iters", "0", "--min-seconds", "0"],
     "argument --iters: expected an integer in [1, 2147483647], got 0"),
    (["bench", "--min-seconds", "-1"], "argument --min-seconds: expected a finite number of seconds >= 0"),
    (["bench", "--batch-size", "0"], "argument --batch-size: expected an integer in [1, 2147483647], got 0"),
    (["bench", "--image-size", "two"], "argument --image-size: expected an integer in [1, 2147483647], got 'two'"),
    (["bench", "--image-size", "200"], "--image-size must be a positive multiple of conformer_small_patch16's "
                                       "patch size 16, got 200"),
    (["bench", "--model", "conformer_small_patch32", "--image-size", "240"], "patch size 32, got 240"),
    (["bench", "--dtype", "fp64"], "argument --dtype: invalid choice: 'fp64'"),
    (["bench", "--model", "resnet50"], "unknown model 'resnet50'"),
    (["bench", "--engines", "--dtype", "bf16"], "--engines runs fp32 and bf16 and torch.compile of both models itself; "
                                                "drop --dtype"),
    (["bench", "--engines", "--compile"], "drop --compile"),
    (["bench", "--json", "{tmp}/missing/bench.json"], "the folder '{tmp}/missing' does not exist"),
    (["bench", "--json", "{tmp}"], "is a folder; expected a file path"),
    (["bench", "--json", ""], "the path is empty"),
    (["bench", "--batch-size", "99999999999999999999"],
     "argument --batch-size: expected an integer in [1, 2147483647]"),
    (["bench", "--seed", "99999999999999999999999"],
     "argument --seed: expected an integer in [0, 9223372036854775807]"),
    (["export", "conformer_tiny_patch16", "{tmp}/m.onnx", "--batch", "99999999999999999999"],
     "argument --batch: expected an integer in [1, 2147483647]"),
    (["bench", "--pretrained", "{tmp}/missing.pth"], "no checkpoint file"),
    (["check", "--only", "nonexistent"], "no check name contains 'nonexistent'"),
    (["check", "--seed", "-1"], "argument --seed: expected an integer in [0, 9223372036854775807], got -1"),
    (["predict", "{photo}", "--pretrained", "{tmp}/missing.pth"], "no checkpoint file"),
    (["predict", "{photo}", "--pretrained", "{ckpt}", "--model", "conformer_tiny_patch16", "--top-k", "0"],
     "argument --top-k: expected an integer in [1, 2147483647], got 0"),
    (["predict", "{photo}", "--pretrained", "{ckpt}", "--model", "conformer_tiny_patch16", "--top-k", "1001"],
     "--top-k must be at most the model's 1000 classes, got 1001"),
    (["info", "--verbose"], "unrecognized arguments: --verbose"),
    ([], "the following arguments are required: command"),
])
def test_wrong_input_gives_one_error_line(argv, message, tmp_path, photo, tiny_checkpoint, capsys):
    names = dict(tmp=tmp_path, photo=photo, ckpt=tiny_checkpoint)
    status, out, err = run([arg.format(**names) for arg in argv], capsys)
    assert status == 2 and out == "" and "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith(("loading ", "building "))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(**names) in lines[0], err
    if any(arg.endswith("missing.pth") for arg in argv):  # the checkpoint is read before any progress line
        assert len(err.splitlines()) == 1, err


def test_checkpoint_mismatch_is_reported_without_a_traceback(photo, tiny_checkpoint, capsys):
    """The mismatch error's message lists the keys on further lines: printed after "error:"."""
    status, out, err = run(["predict", str(photo), "--pretrained", str(tiny_checkpoint), "--model",
                            "conformer_small_patch16"], capsys)
    assert status == 2 and out == "" and "Traceback" not in err
    assert err.splitlines()[1].startswith("error: ") and "conformer_tiny_patch16" in err


def test_output_path_checks_create_and_remove_nothing_else(tmp_path):
    """check_writable (bench --json, export OUT) leaves a dangling link and its target alone, does
    not block on a FIFO, and removes the file its creation test made."""
    from fastconformer.export import check_writable

    link, fifo, loop = tmp_path / "link.json", tmp_path / "fifo", tmp_path / "loop"
    link.symlink_to(tmp_path / "target.json")
    loop.symlink_to(loop)
    os.mkfifo(fifo)
    for path in (link, fifo, tmp_path / "new.json"):
        check_writable(str(path), "--json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.json", "loop"] and link.is_symlink()
    for path, message in ((tmp_path / "missing" / "x.json", "does not exist"), (f"{fifo}/", "cannot be written"),
                          (loop, "cannot be written")):
        with pytest.raises(ValueError, match=message):
            check_writable(str(path), "--json")


def test_sizes_beyond_memory_end_in_one_line(capsys):
    status, _, err = run(["bench", "--model", "conformer_tiny_patch16", "--batch-size", "1000000000"], capsys)
    lines = [line for line in err.splitlines() if not line.startswith("building ")]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: out of memory (")


@pytest.mark.parametrize("argv", [["--json", "{tmp}/missing/bench.json"], ["--image-size", "100"]])
def test_bench_checks_its_arguments_before_building(argv, tmp_path, capsys):
    status, _, err = run(["bench", *[arg.format(tmp=tmp_path) for arg in argv]], capsys)
    assert status == 2 and err.startswith("error: ") and len(err.splitlines()) == 1


def test_predict_top5(photo, tiny_checkpoint, capsys):
    assert main(["predict", str(photo), "--pretrained", str(tiny_checkpoint), "--model", "conformer_tiny_patch16",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(photo) and len(lines) == 6 and lines[1].strip().endswith(
        fastconformer.data.imagenet_classes()[int(lines[1].split()[1])])


def test_the_variant_is_told_from_one_read_of_the_checkpoint(photo, tiny_checkpoint, monkeypatch, capsys):
    """Without --model, predict tells the variant from the checkpoint and builds the model from the
    same read (the file is read once), with the same answer as naming the variant."""
    from fastconformer import registry

    reads = []
    read_state_dict = registry.read_state_dict
    monkeypatch.setattr(registry, "read_state_dict", lambda source: reads.append(source) or read_state_dict(source))
    assert main(["predict", str(photo), "--pretrained", str(tiny_checkpoint), "--device", "cpu"]) == 0
    told = capsys.readouterr().out
    assert [source for source in reads if not isinstance(source, dict)] == [str(tiny_checkpoint)]  # files only
    assert main(["predict", str(photo), "--pretrained", str(tiny_checkpoint), "--model", "conformer_tiny_patch16",
                 "--device", "cpu"]) == 0
    assert capsys.readouterr().out == told


def test_predict_keeps_the_good_images_of_a_bad_batch(photo, tiny_checkpoint, tmp_path, capsys):
    """One line per unreadable image on stderr, results for the others (in batches of two here),
    exit status 1."""
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    line = tmp_path / "line.png"
    Image.new("L", (1, 20000)).save(line)
    gray = tmp_path / "gray16.png"
    Image.new("I;16", (300, 200), 40000).save(gray)
    paths = [photo, not_an_image, tmp_path / "missing.png", line, gray]
    status, out, err = run(["predict", *map(str, paths), "--pretrained", str(tiny_checkpoint), "--model",
                            "conformer_tiny_patch16", "--device", "cpu", "--top-k", "3", "--batch-size", "2"], capsys)
    assert status == 1
    assert out.splitlines()[0::4] == [str(photo), str(gray)] and len(out.splitlines()) == 8
    errors = [e for e in err.splitlines() if e.startswith("error: ")]
    assert errors == [f"error: cannot identify image file {str(not_an_image)!r}",  # the path once
                      f"error: {tmp_path / 'missing.png'}: No such file or directory",
                      f"error: {line}: the image is 1x20000, an aspect ratio of 20000:1; at most 50:1 is supported "
                      "(the centre crop would keep a sliver of it)"]
    assert "Traceback" not in err and "3 of 5 image(s) could not be read" in err


def test_check_runs_float32_without_tf32(monkeypatch, capsys):
    """check judges float32 in IEEE arithmetic whatever the user set (cuDNN's default TF32 would put
    a float32 model ~1e-3 from float64 on a GPU), and gives the user's setting back."""
    from fastconformer import validation
    from fastconformer.kernels import tf32_matmul_enabled
    from fastconformer.testing import tf32

    seen = []

    def fake_run_checks(checks, device, dtypes, backends, seed=0):
        seen.append(tf32_matmul_enabled())
        return iter(())

    monkeypatch.setattr(validation, "run_checks", fake_run_checks)
    with tf32(True):
        status, _, _ = run(["check", "--only", "squeeze", "--device", "cpu"], capsys)
        assert tf32_matmul_enabled()
    assert status == 0 and seen == [False]


def test_predict_with_a_checkpoint_for_other_classes_prints_indices(photo, tmp_path, capsys):
    """A checkpoint fine-tuned to 10 classes builds a 10-class model; ImageNet's names do not apply."""
    torch.manual_seed(0)
    path = fastconformer.save_checkpoint(fastconformer.create_model("conformer_tiny_patch16", num_classes=10),
                                         tmp_path / "ten.safetensors")
    status, out, _ = run(["predict", str(photo), "--pretrained", str(path), "--model", "conformer_tiny_patch16",
                          "--device", "cpu", "--top-k", "3"], capsys)
    assert status == 0
    lines = out.splitlines()
    assert lines[0] == str(photo) and len(lines) == 4
    assert all(len(line.split()) == 2 and 0 <= int(line.split()[1]) < 10 for line in lines[1:]), out


def test_a_spread_is_flagged_as_printed():
    """A spread that prints as 5.0% is not flagged as above 5%; one that prints as 5.1% is."""
    assert cli._spread_warnings({"fast": Timing(warmup=(), rounds=(1.0, 1.0, 1.0, 1.0504, 1.0504))}) == []
    [warning] = cli._spread_warnings({"fast": Timing(warmup=(), rounds=(1.0, 1.0, 1.0, 1.0506, 1.0506))})
    assert "above 5%: fast 5.1%;" in warning


def test_predict_and_bench_take_the_variant_the_checkpoint_holds(photo, tiny_checkpoint, tmp_path, capsys):
    """Without --model: the variant the checkpoint's keys and shapes match, whatever its metadata
    records (create_model records the name it was given, also with arguments that change the
    shapes); a custom configuration or a headless checkpoint is one error line."""
    status, out, err = run(["predict", str(photo), "--pretrained", str(tiny_checkpoint), "--device", "cpu"], capsys)
    assert status == 0 and "loading conformer_tiny_patch16" in err and len(out.splitlines()) == 6
    torch.manual_seed(0)
    folder = fastconformer.save_pretrained(fastconformer.create_model("conformer_tiny_patch16", num_classes=10),
                                           tmp_path / "tiny10")
    status, out, err = run(["predict", str(photo), "--pretrained", str(folder), "--top-k", "2"], capsys)
    assert status == 0 and "loading conformer_tiny_patch16" in err and len(out.splitlines()) == 3
    status, _, err = run(["bench", "--pretrained", str(folder), "--image-size", "64", "--batch-size", "1", "--iters",
                          "1", "--min-seconds", "0", "--device", "cpu"], capsys)
    assert status == 0 and "building conformer_tiny_patch16" in err
    patch32 = fastconformer.save_checkpoint(fastconformer.create_model("conformer_small_patch16", patch_size=32),
                                            tmp_path / "patch32.safetensors")  # its metadata says patch16
    assert fastconformer.hub.read_pretrained_cfg(patch32)["architecture"] == "conformer_small_patch16"
    status, out, err = run(["predict", str(photo), "--pretrained", str(patch32), "--top-k", "1"], capsys)
    assert status == 0 and "loading conformer_small_patch32" in err and len(out.splitlines()) == 2
    custom = fastconformer.create_model("conformer_tiny_patch16", depth=3)
    for path in (fastconformer.save_checkpoint(custom, tmp_path / "custom.pth"),
                 fastconformer.save_pretrained(custom, tmp_path / "custom")):
        status, out, err = run(["predict", str(photo), "--pretrained", str(path)], capsys)
        lines = [line for line in err.splitlines() if not line.startswith("reading ")]
        assert status == 2 and out == "" and len(lines) == 1, err
        assert lines[0].startswith(f"error: cannot tell which registered variant {path} holds (no registered "
                                   "variant matches exactly")
        assert lines[0].endswith("which create_model(name, <that model's arguments>, pretrained=...) loads")
    headless = fastconformer.save_checkpoint(fastconformer.create_model("conformer_tiny_patch16", num_classes=0),
                                             tmp_path / "headless.pth")
    status, _, err = run(["predict", str(photo), "--pretrained", str(headless)], capsys)
    assert status == 2 and err.splitlines()[-1] == (f"error: {headless} has no classifier heads (a num_classes=0 "
                                                    "model's checkpoint): predict needs a classifier's")


def test_check_says_when_the_triton_kernels_are_not_checked(monkeypatch, capsys):
    monkeypatch.setattr(cli, "interpreter_enabled", lambda: False)
    status, out, _ = run(["check", "--device", "cpu", "--only", "attention"], capsys)
    assert status == 0 and "the Triton kernels are not checked here: " in out.splitlines()[1]


def test_a_closed_pipe_ends_quietly():
    """``fastconformer info | head``: no error line and no traceback when the reader goes away."""
    proc = subprocess.run(["bash", "-c", f"'{sys.executable}' -m fastconformer.cli info | head -c 0; "
                                         "exit ${PIPESTATUS[0]}"], capture_output=True, text=True)
    assert proc.stderr == "" and proc.returncode in (0, 141), (proc.returncode, proc.stderr)
