"""`vtc-export` on bad input: one clear `error: ...` line on stderr, a non-zero exit, nothing half-written.

Most tests call `vtc.export.cli.main([...])` in-process (it returns the exit code); Ctrl-C runs the real
console script as a subprocess. Artifacts are copied to tmp_path before they are tampered with.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.subprocs import vtc_export_cmd, wait_for

from vtc.export.cli import main
from vtc.runtime import manifest as mf

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "examples" / "shapes.png"


# -- helpers ---------------------------------------------------------------------------------------
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `vtc-export ARGV` run in-process."""
    capsys.readouterr()  # drop anything captured before
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def error_line(err: str) -> str:
    """The one `error: ...` line; fails if there is none, several, or the message spans lines."""
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, f"expected exactly one 'error:' line in stderr:\n{err}"
    tail = err[err.index("error:"):]
    assert tail.count("\n") == 1 and tail.endswith("\n"), f"the error message spans several lines:\n{tail}"
    assert "Traceback" not in err
    return lines[0]


def assert_fails(capsys, *argv, code: int | None = None, contains: tuple[str, ...] = ()) -> str:
    rc, _out, err = run_cli(capsys, *argv)
    assert rc != 0, f"`vtc-export {' '.join(map(str, argv))}` exited 0; stderr:\n{err}"
    if code is not None:
        assert rc == code, err
    line = error_line(err)
    for s in contains:
        assert s in line, f"{s!r} not in {line!r}"
    return line


def no_partials(parent: Path) -> list[str]:
    """Temp dirs a build may leave next to its output (none expected)."""
    return sorted(p.name for p in parent.glob(".*") if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture
def art_copy(art, tmp_path) -> Path:
    dst = tmp_path / "art"
    shutil.copytree(art, dst)
    return dst


# -- 1. build: bad inputs --------------------------------------------------------------------------
def _bad_dirs(tmp_path: Path) -> dict[str, Path]:
    from transformers import LlamaConfig

    text_only = tmp_path / "llama-text"  # a real text-only checkpoint config: no vision_config
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                architectures=["LlamaForCausalLM"]).save_pretrained(text_only)
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    qwen = tmp_path / "paligemma"  # an unsupported VLM (Qwen2-VL is supported since issue 16)
    qwen.mkdir()
    (qwen / "config.json").write_text(json.dumps(
        {"model_type": "paligemma", "architectures": ["PaliGemmaForConditionalGeneration"], "vision_config": {}}))
    return {"text_only": text_only, "no_config": no_config, "qwen": qwen}


@pytest.mark.parametrize("case, contains", [
    ("missing", ("does not exist", "--model")),
    ("text_only", ("not a vision-language checkpoint", "llava")),
    ("no_config", ("config.json",)),
    ("qwen", ("unsupported architecture", "paligemma", "Supported: llava")),
])
def test_build_bad_model_dir(capsys, tmp_path, case, contains):
    model = tmp_path / "does-not-exist" if case == "missing" else _bad_dirs(tmp_path)[case]
    out = tmp_path / "out" / "art"
    assert_fails(capsys, "build", "--model", model, "--output", out, contains=contains)
    assert not out.exists() and not out.parent.exists()
    assert no_partials(tmp_path) == []


@pytest.mark.parametrize("ratio", ["0", "-0.5", "1.5"])
def test_build_ratio_out_of_range(capsys, tmp_path, ckpt, ratio):
    out = tmp_path / "art"
    line = assert_fails(capsys, "build", "--model", ckpt, "--ratio", ratio, "--output", out, code=2,
                        contains=("--ratio", "out of range", "0 < ratio <= 1"))
    assert str(float(ratio)) in line
    assert not out.exists() and no_partials(tmp_path) == []


def test_build_unknown_method_lists_methods(capsys, tmp_path, ckpt):
    out = tmp_path / "art"
    assert_fails(capsys, "build", "--model", ckpt, "--method", "zip", "--output", out, code=2,
                 contains=("unknown compression method 'zip'", "none", "pool", "cls-attn"))
    assert not out.exists() and no_partials(tmp_path) == []


def test_build_unknown_method_option(capsys, tmp_path, ckpt):
    out = tmp_path / "art"
    assert_fails(capsys, "build", "--model", ckpt, "--method-opt", "bogus=1", "--output", out, code=2,
                 contains=("no option 'bogus'", "window"))
    assert_fails(capsys, "build", "--model", ckpt, "--method-opt", "bogus", "--output", out, code=2,
                 contains=("KEY=VALUE",))
    assert not out.exists() and no_partials(tmp_path) == []


def test_build_existing_output_needs_force(capsys, tmp_path, ckpt):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_fails(capsys, "build", "--model", ckpt, "--output", out, code=2, contains=("already exists", "--force"))
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert no_partials(tmp_path) == []


def test_build_force_replaces_output(capsys, tmp_path, ckpt, art):
    out = tmp_path / "art"
    shutil.copytree(art, out)  # a complete vtc artifact may be replaced (anything else: tests/test_placement.py)
    rc, stdout, err = run_cli(capsys, "build", "--model", ckpt, "--output", out, "--force", "--method", "pool",
                              "--ratio", "0.25", "--max-seq-len", "256", "--text-budget", "48", "--parity-tokens", "2")
    assert rc == 0, err
    m = mf.load(out, check_files=True)  # a complete, valid artifact
    assert (m.compression.method, m.compression.k_visual) == ("pool", 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # no .partial-*/.old-* left behind
    assert "artifact:" in stdout


@pytest.mark.parametrize("target", ["plain-dir", "file", "checkpoint"])
def test_build_force_refuses_what_is_not_an_artifact(capsys, tmp_path, ckpt, target):
    if target == "plain-dir":
        out = tmp_path / "photos"
        out.mkdir()
        (out / "holiday.jpg").write_text("precious")
    elif target == "file":
        out = tmp_path / "notes.txt"
        out.write_text("precious")
    else:
        out = Path(ckpt)
    before = sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()
    rc, _, err = run_cli(capsys, "build", "--model", ckpt, "--output", out, "--force")
    assert rc == 2, err
    assert "--output" in error_line(err)
    assert (sorted(p.name for p in out.iterdir()) if out.is_dir() else out.read_text()) == before


# -- 2. run: bad inputs ----------------------------------------------------------------------------
def _truncated_jpeg(path: Path) -> Path:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    img.save(path, "JPEG")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("case, contains", [
    ("missing", ("does not exist",)),
    ("directory", ("is a directory",)),
    ("text_as_png", ("Cannot read", "x.png", "as an image")),
    ("truncated_jpeg", ("Cannot read", "cut.jpg", "as an image")),
])
def test_run_bad_image(capsys, tmp_path, art, case, contains):
    image = {"missing": lambda: tmp_path / "nope.png",
             "directory": lambda: tmp_path,
             "text_as_png": lambda: (tmp_path / "x.png", (tmp_path / "x.png").write_text("not an image"))[0],
             "truncated_jpeg": lambda: _truncated_jpeg(tmp_path / "cut.jpg")}[case]()
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_fails(capsys, "run", art, "--image", image, "--prompt", "What is this?", code=1, contains=contains)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_run_prompt_over_text_budget(capsys, art):
    budget = mf.load(art).text.budget
    assert budget == 48
    assert_fails(capsys, "run", art, "--image", SHAPES, "--prompt", " ".join(["red"] * (budget + 10)), code=1,
                 contains=(f"at most {budget}", "--text-budget"))


def test_run_raw_prompt_without_image_token(capsys, art):
    assert_fails(capsys, "run", art, "--image", SHAPES, "--prompt", "Describe the picture.", "--raw", code=1,
                 contains=("--raw", "<image>"))


def test_run_ok_baseline(capsys, art):
    """The same artifact and image work: the failures above are about the bad input only."""
    rc, out, err = run_cli(capsys, "run", art, "--image", SHAPES, "--prompt", "What is this?", "--max-new-tokens", "3",
                           "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert 1 <= len(res["token_ids"]) <= 3


# -- 3. damaged artifacts: run, inspect, verify ----------------------------------------------------
def _edit_manifest(d: Path, fn) -> None:
    p = d / mf.MANIFEST
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data, indent=2))


def _flip_bytes(p: Path, at: int = 1000, n: int = 8) -> None:
    b = bytearray(p.read_bytes())
    for i in range(at, at + n):
        b[i] ^= 0xFF
    p.write_bytes(bytes(b))


TAMPER = {
    "missing_vision": (lambda d: (d / "vision.onnx").unlink(), ("vision.onnx", "missing", "rebuild")),
    "appended_llm_data": (lambda d: open(d / "llm.onnx.data", "ab").write(b"\0"),
                          ("checksum mismatch", "llm.onnx.data", "Rebuild")),
    "flipped_vision": (lambda d: _flip_bytes(d / "vision.onnx"), ("checksum mismatch", "vision.onnx", "Rebuild")),
    "invalid_json": (lambda d: (d / mf.MANIFEST).write_text('{"schema": "vtc.artifact",'),
                     ("manifest.json", "not valid JSON", "rebuild")),
    "unknown_key": (lambda d: _edit_manifest(d, lambda m: m.update(extra=1)), ("unknown keys ['extra']", "rebuild")),
    "unknown_nested_key": (lambda d: _edit_manifest(d, lambda m: m["text"].update(extra=1)),
                           ("manifest text has unknown keys ['extra']",)),
    "missing_key": (lambda d: _edit_manifest(d, lambda m: m.pop("lm")), ("missing keys ['lm']", "rebuild")),
    "newer_schema": (lambda d: _edit_manifest(d, lambda m: m.update(schema_version=mf.SCHEMA_VERSION + 1)),
                     (f"schema version {mf.SCHEMA_VERSION + 1}", "Upgrade vtc")),
    "no_manifest": (lambda d: (d / mf.MANIFEST).unlink(), ("no manifest.json", "vtc-export build")),
}


def _command(cmd: str, d: Path) -> list:
    return {"run": ["run", d, "--image", SHAPES, "--prompt", "What is this?", "--max-new-tokens", "2"],
            "inspect": ["inspect", d],
            "verify": ["verify", d, "--tokens", "2"]}[cmd]


@pytest.mark.parametrize("cmd", ["run", "inspect", "verify"])
@pytest.mark.parametrize("damage", list(TAMPER))
def test_damaged_artifact(capsys, art_copy, cmd, damage):
    tamper, contains = TAMPER[damage]
    tamper(art_copy)
    files = {p.name: p.stat().st_size for p in art_copy.iterdir()}
    assert_fails(capsys, *_command(cmd, art_copy), code=1, contains=contains)
    assert {p.name: p.stat().st_size for p in art_copy.iterdir()} == files  # nothing rewritten


@pytest.mark.parametrize("cmd", ["run", "inspect", "verify"])
def test_missing_artifact_dir(capsys, tmp_path, cmd):
    assert_fails(capsys, *_command(cmd, tmp_path / "nope"), code=1, contains=("does not exist", "vtc-export build"))


def _rewrite_file_table(d: Path) -> None:
    """What a determined tamperer does: also update the checksums in the manifest."""
    _edit_manifest(d, lambda m: m.update(files=mf.file_table(d)))


def test_verify_catches_tampered_graph_with_updated_checksums(capsys, art_copy):
    """Checksums cannot catch this; verify's parity against the PyTorch checkpoint must."""
    import onnx
    from onnx import numpy_helper

    path = art_copy / "vision.onnx"
    model = onnx.load(str(path))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    w = numpy_helper.to_array(init)
    # random (not constant) noise: a constant shift of the patch embedding would be undone by LayerNorm
    w = w + np.random.default_rng(0).standard_normal(w.shape).astype(w.dtype) * 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    _rewrite_file_table(art_copy)
    rc, _out, err = run_cli(capsys, "inspect", art_copy)
    assert rc == 0, err  # the manifest is consistent: only a parity check can tell
    report = art_copy.parent / "report.json"
    rc, out, err = run_cli(capsys, "verify", art_copy, "--tokens", "2", "--json", report)
    assert rc == 1
    line = error_line(err)
    assert "do not match the PyTorch model" in line and "vision" in line
    assert "Rebuild" in line
    assert "verify: ok" not in out
    assert json.loads(report.read_text())["ok"] is False


def test_run_unloadable_graph_with_updated_checksums(capsys, art_copy):
    (art_copy / "vision.onnx").write_bytes(b"\xff" * 64)
    _rewrite_file_table(art_copy)
    assert_fails(capsys, *_command("run", art_copy), code=1, contains=("could not load", "vision.onnx", "Rebuild"))


# -- 4. Ctrl-C during build ------------------------------------------------------------------------
def test_ctrl_c_during_build_leaves_nothing(tmp_path, ckpt):
    parent = tmp_path / "arts"
    parent.mkdir()
    out = parent / "art"
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    # A shell that runs us in the background may ignore SIGINT, and ignored signals stay ignored across
    # exec: make sure the child starts with the default disposition (Python then raises KeyboardInterrupt).
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with open(log, "wb") as errf:
            proc = subprocess.Popen([*vtc_export_cmd(), "build", "--model", str(ckpt), "--output", str(out),
                                     "--max-seq-len", "256", "--text-budget", "48"],
                                    stdout=subprocess.DEVNULL, stderr=errf, env=env, cwd=tmp_path)
    finally:
        signal.signal(signal.SIGINT, old)
    try:
        partial = wait_for(lambda: next(iter(parent.glob(".art.partial-*")), None), proc,
                           "the .art.partial-* directory", log)
        # The temp dir exists once mkdtemp returned; the first file in it proves the child is past
        # mkdtemp and inside the cleanup guard, exporting (vision.onnx, then the LLM and parity follow).
        new = partial / "new"  # the artifact being written (owner.json beside it marks the build's own)
        wait_for(lambda: new.is_dir() and any(new.iterdir()), proc, "the first exported file", log)
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = log.read_text()
    assert rc == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists(), err
    assert list(parent.iterdir()) == [], err


# -- 5. help and list ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [[], ["build"], ["run"], ["verify"], ["inspect"], ["list"]])
def test_help_has_examples(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "\nexamples:\n" in out
    assert "vtc-export " + (argv[0] if argv else "") in out.split("\nexamples:\n", 1)[1]


def test_list(capsys):
    rc, out, err = run_cli(capsys, "list")
    assert rc == 0, err
    for name in ("pool", "cls-attn", "none", "llava"):
        assert name in out


# -- 6. input bounds and one-line errors (issue 15: defects 4, 6 and 7) ----------------------------
# Each test is one reproducer of the audit: the exit code, exactly one `error: ...` line, no traceback,
# nothing written. `_no_work` replaces the expensive step a check must come before with a test failure.
WORK = {"eval": ("vtc.runtime.pipeline", "VLM"), "run": ("vtc.runtime.pipeline", "VLM"),
        "verify": ("vtc.export.verify", "verify"), "calibrate": ("vtc.export.kvquant", "write_scales"),
        "profile": ("vtc.runtime.profiler", "open_artifact"), "compare": ("vtc.export.compare", "compare_artifact"),
        "build": ("vtc.export.models", "resolve")}


def _no_work(monkeypatch, cmd: str) -> None:
    import importlib

    module, attr = WORK[cmd]

    def fail(*_a, **_k):
        pytest.fail(f"`{cmd}` started its work ({module}.{attr}) before refusing its bad arguments")

    monkeypatch.setattr(importlib.import_module(module), attr, fail)


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


@pytest.mark.parametrize("width", [30000, 80000])
def test_run_image_over_the_pixel_limits(capsys, tmp_path, monkeypatch, art, width):
    """Defect 4: a 168-byte 30000x1 PNG took 4.9 GB and 10 s (80000x1: over 12 GB). Now refused from its
    header, before the artifact loads (peak RSS measured in tests/test_input_bounds.py)."""
    from PIL import Image

    img = tmp_path / f"w{width}.png"
    Image.new("RGB", (width, 1)).save(img)
    before = _listing(tmp_path)
    _no_work(monkeypatch, "run")
    assert_fails(capsys, "run", art, "--image", img, "--prompt", "What is this?", code=1,
                 contains=(f"{width}x1 pixels", "40 MP", "16384 pixels a side"))
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("cmd", ["run", "profile"])
@pytest.mark.parametrize("threads", ["100000", "-1"])
def test_threads_bounded_by_the_usable_cores(capsys, monkeypatch, art, cmd, threads):
    """Defect 4: --threads 100000 exhausted the host; negative counts were accepted."""
    _no_work(monkeypatch, cmd)
    argv = ["run", art, "--image", SHAPES, "--prompt", "What?"] if cmd == "run" else ["profile", art, "--runs", "1"]
    assert_fails(capsys, *argv, "--threads", threads, code=2, contains=(f"--threads {threads}", "usable core"))


def test_sweep_threads_refused_before_any_build(capsys, tmp_path, monkeypatch, ckpt):
    out = tmp_path / "sweep"
    _no_work(monkeypatch, "build")
    assert_fails(capsys, "sweep", "--model", ckpt, "--methods", "pool", "--ratios", "1.0,0.5", "--threads", "-1",
                 "--output", out, code=2, contains=("--threads -1", "usable core"))
    assert _listing(tmp_path) == []


def test_vtc_threads_environment_checked_too(capsys, monkeypatch, art):
    monkeypatch.setenv("VTC_THREADS", "abc")
    _no_work(monkeypatch, "run")
    assert_fails(capsys, "run", art, "--image", SHAPES, "--prompt", "What?", code=2, contains=("VTC_THREADS 'abc'",))


@pytest.mark.parametrize("flags, contains", [
    (("--temperature", "nan"), "--temperature nan"),  # defect 6: AttributeError in the sampler
    (("--seed", "-5", "--temperature", "1"), "--seed -5"),  # defect 6: numpy's ValueError
    (("--temperature", "-1"), "--temperature -1"),  # defect 7: accepted silently (greedy)
    (("--temperature", "inf"), "--temperature inf"),
    (("--temperature", "1", "--top-p", "0"), "--top-p 0"),
    (("--temperature", "1", "--top-p", "2"), "--top-p 2"),
    (("--temperature", "1", "--top-p", "nan"), "--top-p nan"),
])
def test_run_sampling_flags_validated(capsys, monkeypatch, art, flags, contains):
    _no_work(monkeypatch, "run")
    assert_fails(capsys, "run", art, "--image", SHAPES, "--prompt", "What?", *flags, code=2, contains=(contains,))


@pytest.mark.parametrize("flags, contains", [
    (("--parity-tokens", "0"), ("--parity-tokens 0",)),  # was a traceback after an 11 s export
    (("--max-seq-len", str(10 ** 9)), ("--max-seq-len 1000000000", "1048576")),  # was 715 GiB at parity
    (("--text-budget", "300", "--max-seq-len", "256"), ("--text-budget 300",)),
    (("--kv-cache", "int8", "--kv-statistic", "percentile:abc"), ("--kv-statistic 'percentile:abc'",)),
    (("--kv-cache", "int8", "--kv-scales", "{dir}"), ("--kv-scales", "is a directory, not a file")),
    (("--kv-cache", "int8", "--calib-images", str(SHAPES), "--calib-prompts", str(SHAPES)),
     ("--calib-images", "is a file, not a directory")),
    (("--kv-cache", "int8", "--calib-images", "{dir}", "--calib-prompts", "{dir}"),
     ("--calib-prompts", "is a directory, not a file")),
])
def test_build_flags_refused_before_the_checkpoint_is_read(capsys, tmp_path, monkeypatch, ckpt, flags, contains):
    out = tmp_path / "out"
    flags = [f.replace("{dir}", str(tmp_path)) for f in flags]
    _no_work(monkeypatch, "build")
    assert_fails(capsys, "build", "--model", ckpt, "--output", out, *flags, code=2, contains=contains)
    assert _listing(tmp_path) == []


def test_calibrate_statistic_refused_before_the_checkpoint_is_read(capsys, tmp_path, monkeypatch, ckpt):
    _no_work(monkeypatch, "build")
    assert_fails(capsys, "calibrate", "--model", ckpt, "--ratio", "1.0", "--kv-statistic", "percentile:abc",
                 "-o", tmp_path / "s.json", code=2, contains=("--kv-statistic",))
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("tokens, contains", [("0", "--tokens must be at least 1"), ("100000", "--tokens 100000")])
def test_verify_tokens_bounded(capsys, monkeypatch, art, tokens, contains):
    """Defect 6: `verify --tokens 0` was a traceback; 100000 ran PyTorch for minutes before failing."""
    _no_work(monkeypatch, "verify")
    assert_fails(capsys, "verify", art, "--tokens", tokens, code=2, contains=(contains,))


def _model_copy(ckpt: Path, tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(ckpt, model)
    return model


@pytest.mark.parametrize("damage", ["truncated", "header_length_1e15"])
def test_build_damaged_safetensors(capsys, tmp_path, ckpt, damage):
    """Defect 6: safetensors' own SafetensorError escaped as a traceback."""
    model = _model_copy(ckpt, tmp_path)
    f = model / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else (10 ** 15).to_bytes(8, "little") + data[8:])
    out = tmp_path / "out"
    assert_fails(capsys, "build", "--model", model, "--output", out, code=1,
                 contains=("model.safetensors", "not a complete safetensors file", "Re-download"))
    assert not out.exists() and no_partials(tmp_path) == []


@pytest.mark.parametrize("text, contains", [("[1, 2]", "is a JSON list, not an object"),
                                            ("[" * 100000 + "]" * 100000, "nested too deeply")])
def test_build_config_json_not_an_object(capsys, tmp_path, ckpt, text, contains):
    model = _model_copy(ckpt, tmp_path)
    (model / "config.json").write_text(text)
    out = tmp_path / "out"
    assert_fails(capsys, "build", "--model", model, "--output", out, code=1, contains=("config.json", contains))
    assert not out.exists() and no_partials(tmp_path) == []


def test_build_without_tokenizer_fails_before_loading_the_model(capsys, tmp_path, monkeypatch, ckpt):
    """Defect 7: tokenizer.json was checked only after the export."""
    from vtc.export.models.llava import ADAPTER

    model = _model_copy(ckpt, tmp_path)
    (model / "tokenizer.json").unlink()
    monkeypatch.setattr(type(ADAPTER), "load", lambda *_a, **_k: pytest.fail("the model was loaded first"))
    out = tmp_path / "out"
    assert_fails(capsys, "build", "--model", model, "--output", out, code=1, contains=("no tokenizer.json",))
    assert not out.exists() and no_partials(tmp_path) == []


def _kv_scales(art: Path, path: Path, edit) -> Path:
    m = mf.load(art)
    heads, dim = m.lm.num_kv_heads, m.lm.head_dim
    data = {"schema": "vtc.kv_scales", "version": 1,
            "model": {"num_layers": m.lm.num_layers, "num_kv_heads": heads, "head_dim": dim},
            "compression": {"method": "none", "k_visual": m.compression.k_visual},
            "statistic": "absmax", "granularity": "channel", "calibration": {"set": "test", "pairs": 1},
            "layers": [{"k": [[1.0] * dim] * heads, "v": [[1.0] * dim] * heads} for _ in range(m.lm.num_layers)]}
    edit(data)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, contains", [
    (lambda d: d.pop("calibration"), "no 'calibration' object"),  # defect 6: KeyError
    (lambda d: d["layers"][0]["k"][0].__setitem__(0, 1e300), "threshold of 1e+300"),  # defect 7: "a vtc bug"
])
def test_build_bad_kv_scales_file(capsys, tmp_path, ckpt, art, edit, contains):
    scales = _kv_scales(art, tmp_path / "kv_scales.json", edit)
    out = tmp_path / "out"
    line = assert_fails(capsys, "build", "--model", ckpt, "--method", "none", "--kv-cache", "int8", "--kv-scales",
                        scales, "--output", out, "--max-seq-len", "256", "--text-budget", "48", code=1,
                        contains=("--kv-scales", contains, "vtc-export calibrate"))
    assert "vtc bug" not in line
    assert not out.exists() and no_partials(tmp_path) == []


def test_build_output_dot(capsys, tmp_path, monkeypatch, ckpt):
    monkeypatch.chdir(tmp_path)
    for force in ((), ("--force",)):
        assert_fails(capsys, "build", "--model", ckpt, "--output", ".", *force, code=2, contains=("--output .",))
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("where", ["under_a_file", "read_only_mount"])
def test_build_unwritable_output(capsys, tmp_path, ckpt, where):
    if where == "under_a_file":
        (tmp_path / "notes.txt").write_text("mine")
        out = tmp_path / "notes.txt" / "art"
    else:
        if not Path("/sys").is_dir():
            pytest.skip("no /sys")
        out = Path("/sys/vtc-test-artifact")
    assert_fails(capsys, "build", "--model", ckpt, "--output", out, code=2, contains=(str(out.parent),))
    assert not out.exists()
    if where == "under_a_file":
        assert _listing(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def _writer_argv(cmd: str, art: Path, ckpt: Path, target: Path) -> list:
    return {"eval": ["eval", art, "--dataset", "synthetic", "--limit", "2", "--json", target],
            "verify": ["verify", art, "--tokens", "2", "--json", target],
            "calibrate": ["calibrate", "--model", ckpt, "--ratio", "1.0", "-o", target],
            "profile": ["profile", art, "--runs", "1", "--csv", target],
            "compare": ["compare", art, "--backends", "ort,ort", "--json", target],
            "run": ["run", art, "--image", SHAPES, "--prompt", "What?", "--overlay", target]}[cmd]


@pytest.mark.parametrize("cmd", ["eval", "verify", "calibrate", "profile", "compare", "run"])
@pytest.mark.parametrize("target, contains", [("missing/out.json", "its directory does not exist"),
                                              (".", "is a directory, not a file")])
def test_output_file_checked_before_the_work(capsys, tmp_path, monkeypatch, art, ckpt, cmd, target, contains):
    """Defect 6: --json/-o into a missing directory failed after all the work (eval, verify, calibrate);
    `profile --csv DIR` was an IsADirectoryError."""
    _no_work(monkeypatch, cmd)
    before = _listing(tmp_path)
    assert_fails(capsys, *_writer_argv(cmd, art, ckpt, tmp_path / target), code=2, contains=(contains,))
    assert _listing(tmp_path) == before


def test_eval_non_utf8_and_deeply_nested_lines(capsys, tmp_path, art):
    """Defect 6: a non-UTF-8 dataset was a UnicodeDecodeError, deep nesting a RecursionError. Now they are
    bad lines like any other, reported with their numbers."""
    ds = tmp_path / "ds.jsonl"
    good = json.dumps({"image": str(SHAPES), "question": "what color is the circle?", "answer": "red"})
    ds.write_bytes(b'{"image": "x.png", "question": "caf\xe9?", "answer": "no"}\n'
                   + ("[" * 100000 + "]" * 100000).encode() + b"\n" + good.encode() + b"\n")
    rc, out, err = run_cli(capsys, "eval", art, "--dataset", ds, "--max-new-tokens", "2")
    assert rc == 0, err
    assert "Traceback" not in err and "1 examples" in out
    assert "skipped line 1:" in err and "not UTF-8" in err and "skipped line 2:" in err and "nested too deeply" in err
    assert_fails(capsys, "eval", art, "--dataset", ds, "--on-error", "stop", code=1, contains=("line 1", "not UTF-8"))


@pytest.mark.parametrize("content", ['{"image": "missing.png", "question": "q?", "answer": "no"}\n', ""])
def test_eval_nothing_scored_exits_1(capsys, tmp_path, art, content):
    """Defect 7: eval exited 0 (accuracy "-") when no example was scored."""
    ds = tmp_path / "ds.jsonl"
    ds.write_text(content)
    report = tmp_path / "report.json"
    line = assert_fails(capsys, "eval", art, "--dataset", ds, "--json", report, code=1, contains=("no example",))
    assert ("missing.png does not exist" in line) == bool(content)
    assert not report.exists()


@pytest.mark.parametrize("case, contains", [
    ("model_is_a_file", ("--model", "is a file, not a directory")),
    ("dataset_is_a_directory", ("dataset", "is a directory, not a file")),
    ("artifact_is_a_file", ("not a directory",)),
])
def test_paths_of_the_wrong_kind_say_so(capsys, tmp_path, art, case, contains):
    """Defect 7: a directory was reported as "does not exist"."""
    argv = {"model_is_a_file": ["build", "--model", SHAPES, "--output", tmp_path / "out"],
            "dataset_is_a_directory": ["eval", art, "--dataset", tmp_path],
            "artifact_is_a_file": ["run", SHAPES, "--image", SHAPES, "--prompt", "What?"]}[case]
    line = assert_fails(capsys, *argv, code=None, contains=contains)
    assert "does not exist" not in line
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("steps", ["-1", "0", "100000"])
def test_compare_decode_steps_names_its_own_flag(capsys, art, steps):
    """Defect 7: `compare --decode-steps -1` named --max-new-tokens."""
    line = assert_fails(capsys, "compare", art, "--backends", "ort,ort", "--decode-steps", steps, code=2,
                        contains=(f"--decode-steps {steps}" if steps == "100000" else "--decode-steps",))
    assert "--max-new-tokens" not in line


def test_lint_target_cc_must_be_a_compute_capability(capsys, art):
    """Defect 6: `lint --target-cc abc` was a ValueError (FP8 graphs) or silently accepted."""
    assert_fails(capsys, "lint", art, "--target-cc", "abc", code=2, contains=("--target-cc 'abc'", "8.7"))
