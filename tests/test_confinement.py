"""Issue 15, defect 3: the manifest is a trust boundary. Every path it names stays inside the artifact, is a
regular file reached without symlinks and is listed (size + sha256) in `files`; a graph file must be the
graph the manifest describes; `run`/`inspect`/`lint` check sizes (small files: hashes) at load, `verify` and
`inspect --verify-hashes` every sha256; `inspect` prints the artifact digest (sha256 of manifest.json).

Each failure is one clean `error:` line and exit 1, and no file outside the artifact is read."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from vtc.export.cli import main
from vtc.runtime import artifact_check as ac
from vtc.runtime import manifest as mf
from vtc.runtime.errors import ArtifactError

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "examples" / "shapes.png"


# -- helpers ---------------------------------------------------------------------------------------
def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys, *argv, contains: tuple[str, ...] = ()) -> str:
    """`vtc-export ARGV` exits 1 with exactly one one-line `error:` and no traceback."""
    rc, _out, err = run_cli(capsys, *argv)
    assert rc == 1, f"exit {rc}; stderr:\n{err}"
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and err[err.index("error:"):].count("\n") == 1, err
    for s in contains:
        assert s in lines[0], f"{s!r} not in {lines[0]!r}"
    return lines[0]


def edit(art: Path, fn) -> None:
    p = art / mf.MANIFEST
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data, indent=2))


def entry(p: Path) -> dict:
    return {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}


def run_argv(art: Path) -> list:
    return ["run", art, "--image", SHAPES, "--prompt", "What is this?", "--max-new-tokens", "2"]


COMMANDS = {"run": run_argv, "inspect": lambda a: ["inspect", a], "lint": lambda a: ["lint", a]}


class Opens:
    """Paths Python opens while active (sys.addaudithook: builtins.open, os.open, io.open_code...)."""

    hooked = False
    active: list | None = None

    def __enter__(self):
        if not Opens.hooked:
            sys.addaudithook(Opens._hook)
            Opens.hooked = True
        Opens.active = []
        return Opens.active

    def __exit__(self, *exc):
        Opens.active = None

    @staticmethod
    def _hook(event, args):
        if Opens.active is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            Opens.active.append(os.fsdecode(args[0]))


@pytest.fixture(scope="module")
def art_a(artifact_factory) -> Path:
    return artifact_factory("mha-default", "none")


@pytest.fixture(scope="module")
def art_b(artifact_factory) -> Path:
    """Another artifact of the same checkpoint (pool 0.25: its vision graph gives 9 tokens, not 36)."""
    return artifact_factory("mha-default", "pool", 0.25)


@pytest.fixture
def side_by_side(art_a, art_b, tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(art_a, a)
    shutil.copytree(art_b, b)
    return a, b


# -- paths the manifest names ----------------------------------------------------------------------
@pytest.mark.parametrize("cmd", list(COMMANDS))
@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_graph_path_outside_the_artifact_is_refused(capsys, side_by_side, cmd, how):
    """Defect 3: graphs.vision.file pointing at another artifact's graph ran it (the answer changed) and
    inspect/lint passed; an absolute or ../ path is now refused before anything is opened."""
    a, b = side_by_side
    target = str(b / "vision.onnx") if how == "absolute" else "../b/vision.onnx"
    edit(a, lambda m: m["graphs"]["vision"].update(file=target))
    line = fails(capsys, *COMMANDS[cmd](a), contains=("graphs.vision.file", "outside the artifact"))
    assert "Traceback" not in line


@pytest.mark.parametrize("field, value", [
    (("embeddings", "file"), "../b/embed_tokens.npy"),
    (("embeddings", "file"), "/etc/passwd"),
    (("text", "chat_template"), "../b/chat_template.jinja"),
    (("graphs", "llm", "file"), "./llm.onnx"),
    (("graphs", "llm", "file"), "sub//llm.onnx"),
    (("graphs", "llm", "file"), "llm.onnx/"),
    (("graphs", "llm", "file"), ".hidden.onnx"),
    (("graphs", "llm", "file"), "a\\..\\llm.onnx"),
])
def test_every_named_path_is_confined(side_by_side, field, value):
    a, _ = side_by_side

    def put(m):
        node = m
        for k in field[:-1]:
            node = node[k]
        node[field[-1]] = value

    edit(a, put)
    with pytest.raises(ArtifactError, match=r"manifest field .*(outside the artifact|must be that or null)"):
        mf.load(a)


def test_graph_of_another_artifact_copied_in_and_listed_is_not_this_graph(capsys, side_by_side):
    """Copied inside and listed with its real sha256, B's vision graph still is not A's: its outputs differ."""
    a, b = side_by_side
    shutil.copy2(b / "vision.onnx", a / "vision_b.onnx")
    edit(a, lambda m: (m["graphs"]["vision"].update(file="vision_b.onnx"),
                       m["files"].update({"vision_b.onnx": entry(a / "vision_b.onnx")})))
    fails(capsys, *run_argv(a), contains=("graph vision", "vision_b.onnx", "not this graph"))


@pytest.mark.parametrize("cmd", list(COMMANDS))
@pytest.mark.parametrize("swap", [False, True])
def test_graph_swapped_for_another_listed_file(capsys, art_a, tmp_path, cmd, swap):
    """graphs.vision.file -> llm.onnx (inside, listed, hashes correct), alone or swapped with llm's file:
    one clean error at load (the ONNX file's declared inputs/outputs are not the manifest's)."""
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    edit(a, lambda m: (m["graphs"]["vision"].update(file="llm.onnx"),
                       m["graphs"]["llm"].update(file="vision.onnx") if swap else None))
    line = fails(capsys, *COMMANDS[cmd](a))
    assert "llm.onnx" in line and ("not this graph" if swap else "same file") in line


def test_in_llm_segments_swapped(capsys, artifact_factory, tmp_path):
    a = tmp_path / "fastv"
    shutil.copytree(artifact_factory("mqa-layer-1", "fastv", 0.25, method_options={}), a)
    edit(a, lambda m: (m["graphs"]["llm_pre"].update(file="llm_post.onnx"),
                       m["graphs"]["llm_post"].update(file="llm_pre.onnx")))
    fails(capsys, *run_argv(a), contains=("llm_p", "not this graph"))


# -- the files table -------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_empty_files_table_disables_nothing(capsys, art_a, tmp_path, cmd):
    """Defect 3: `"files": {}` disabled every check; now every named file must be listed."""
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    edit(a, lambda m: m.update(files={}))
    fails(capsys, *COMMANDS[cmd](a), contains=("files table does not list", "Rebuild"))


@pytest.mark.parametrize("key", ["../b/vision.onnx", "/etc/hostname", "x/../../b/vision.onnx"])
def test_files_key_outside_is_an_error_and_never_read(side_by_side, key):
    """Defect 3: `files` keys with ../ hashed files outside the artifact. Now refused before any file is
    opened (an audit hook records every path Python opens)."""
    a, b = side_by_side
    outside = Path(key) if key.startswith("/") else b / "vision.onnx"
    edit(a, lambda m: m["files"].update({key: entry(b / "vision.onnx")}))
    with Opens() as opened:
        with pytest.raises(ArtifactError, match=r"files\[.*outside the artifact"):
            mf.load(a, check_files="hashes")
    assert not [p for p in opened if Path(p).resolve() == outside.resolve() or str(b) in str(Path(p).resolve())]


def test_deleted_files_entry_of_external_data(capsys, art_a, tmp_path):
    """llm.onnx.data is read by ONNX Runtime through llm.onnx: it must be listed too."""
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    edit(a, lambda m: m["files"].pop("llm.onnx.data"))
    fails(capsys, *run_argv(a), contains=("llm.onnx", "external data", "llm.onnx.data"))


@pytest.mark.parametrize("name, content", [
    ("processor_config.json", {"chat_template": "{{ 'pwned' }}"}),  # would win over chat_template.jinja
    ("special_tokens_map.json", {"eos_token": "<s>"}),
    ("config.json", {"eos_token_id": 7}),
])
def test_unlisted_file_the_runtime_reads_is_refused(capsys, art_a, tmp_path, name, content):
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    (a / name).write_text(json.dumps(content))
    fails(capsys, *run_argv(a), contains=(name, "not listed"))


def test_unrelated_user_files_are_allowed(art_a, tmp_path):
    """Files a user keeps in an artifact (notes, results) are neither read nor refused."""
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    (a / "notes.txt").write_text("mine")
    (a / "results").mkdir()
    mf.load(a)


def test_generation_config_eos_must_match(art_a, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    edit(a, lambda m: m["text"].update(eos_token_ids=[3]))
    with pytest.raises(ArtifactError, match="generation_config.json gives EOS ids 2"):
        mf.load(a)


def test_chat_template_null_while_the_runtime_would_read_one(art_a, tmp_path):
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    edit(a, lambda m: m["text"].update(chat_template=None))
    with pytest.raises(ArtifactError, match="chat_template"):
        mf.load(a)


def test_embeddings_header_must_match(art_a, tmp_path):
    """Same bytes, other shape (transposed header), files table updated: refused from the .npy header."""
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    table = np.load(a / "embed_tokens.npy")
    np.save(a / "embed_tokens.npy", np.ascontiguousarray(table.reshape(table.shape[::-1])), allow_pickle=False)
    edit(a, lambda m: m["files"].update({"embed_tokens.npy": entry(a / "embed_tokens.npy")}))
    with pytest.raises(ArtifactError, match=rf"embed_tokens.npy holds float32\[{table.shape[1]}, {table.shape[0]}\]"):
        mf.load(a)


# -- symlinks --------------------------------------------------------------------------------------
def test_symlinked_graph_pointing_out_is_refused(capsys, side_by_side):
    """A symlink inside the artifact to an identical copy outside (same size and sha256) is still refused."""
    a, b = side_by_side
    shutil.copy2(a / "vision.onnx", b / "a_vision.onnx")
    (a / "vision.onnx").unlink()
    (a / "vision.onnx").symlink_to(b / "a_vision.onnx")
    fails(capsys, *run_argv(a), contains=("vision.onnx", "symlink"))


def test_symlinked_parent_directory_is_refused(side_by_side):
    a, b = side_by_side
    (b / "sub").mkdir()
    shutil.copy2(a / "vision.onnx", b / "sub" / "vision.onnx")
    (a / "sub").symlink_to(b / "sub")
    edit(a, lambda m: (m["graphs"]["vision"].update(file="sub/vision.onnx"), m["files"].pop("vision.onnx"),
                       m["files"].update({"sub/vision.onnx": entry(b / "sub" / "vision.onnx")})))
    with pytest.raises(ArtifactError, match="through a symlink"):
        mf.load(a, check_files="hashes")


def test_symlinked_manifest_is_refused(side_by_side):
    a, b = side_by_side
    (a / mf.MANIFEST).unlink()
    (a / mf.MANIFEST).symlink_to(b / mf.MANIFEST)
    with pytest.raises(ArtifactError, match="symlink"):
        mf.load(a)


def test_symlinked_artifact_directory_itself_is_fine(art_a, tmp_path):
    """Only what is below the artifact directory is confined: `artifacts/current -> v3` works."""
    (tmp_path / "current").symlink_to(art_a)
    assert mf.load(tmp_path / "current") == mf.load(art_a)


# -- cheap and full checks, the digest -------------------------------------------------------------
def _flip_inside_initializer(p: Path) -> None:
    """Change weight bytes only (the graph's structure still parses): same size, other sha256."""
    data = bytearray(p.read_bytes())
    at = len(data) // 2
    data[at:at + 8] = bytes(b ^ 0x55 for b in data[at:at + 8])
    p.write_bytes(bytes(data))


def test_levels_sizes_and_hashes(capsys, art_a, tmp_path, monkeypatch):
    """Issue 13: `run` does not hash large files at every load. With small-file hashing off (real graphs
    are far above SMALL_FILE_BYTES), a same-size edit of llm.onnx.data passes the cheap check; `verify`'s
    and `inspect --verify-hashes`' full check refuses it; a size change is refused by both."""
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    monkeypatch.setattr(ac, "SMALL_FILE_BYTES", 0)
    _flip_inside_initializer(a / "llm.onnx.data")
    mf.load(a)  # default: sizes
    mf.load(a, check_files="sizes")
    with pytest.raises(ArtifactError, match="checksum mismatch for .*llm.onnx.data"):
        mf.load(a, check_files="hashes")
    rc, _out, err = run_cli(capsys, "inspect", a)
    assert rc == 0, err
    fails(capsys, "inspect", a, "--verify-hashes", contains=("checksum mismatch", "llm.onnx.data"))
    fails(capsys, "verify", a, "--tokens", "2", contains=("checksum mismatch", "llm.onnx.data"))
    with open(a / "llm.onnx.data", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="checksum mismatch .*llm.onnx.data: it is .* bytes"):
        mf.load(a, check_files="sizes")


def test_small_files_are_hashed_at_load(art_a, tmp_path):
    """Below SMALL_FILE_BYTES (tokenizer, template, configs) the cheap check hashes too: a same-size edit
    of the chat template is refused at `run`."""
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    p = a / "chat_template.jinja"
    p.write_text(p.read_text().replace("ASSISTANT:", "ADMIN:    "))
    with pytest.raises(ArtifactError, match="checksum mismatch for .*chat_template.jinja"):
        mf.load(a)


def test_check_files_levels_are_validated(art_a):
    from vtc.runtime.errors import UsageError

    assert mf.load(art_a, check_files=True) == mf.load(art_a, check_files=False) == mf.load(art_a)
    with pytest.raises(UsageError, match="not a file-check level"):
        mf.load(art_a, check_files="everything")


def test_inspect_prints_the_artifact_digest(capsys, art_a, tmp_path):
    want = hashlib.sha256((art_a / mf.MANIFEST).read_bytes()).hexdigest()
    rc, out, err = run_cli(capsys, "inspect", art_a)
    assert rc == 0, err
    assert f"artifact digest: sha256:{want}" in " ".join(out.split())
    rc, out, _ = run_cli(capsys, "inspect", art_a, "--json")
    assert rc == 0 and json.loads(out) == json.loads((art_a / mf.MANIFEST).read_text())  # --json: the manifest
    assert mf.load_with_digest(art_a)[1] == want
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    edit(a, lambda m: m.update(created_utc="2000-01-01T00:00:00+00:00"))  # an informational edit still shows
    assert mf.load_with_digest(a)[1] != want


def test_inspect_prints_manifest_text_as_text(capsys, art_a, tmp_path):
    """Informational strings are shown as they are: rich markup in them neither styles nor crashes."""
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    edit(a, lambda m: (m["model"].update(source="[/bold] [red]x"), m.update(created_utc="[/]"),
                       m["parity"].update(graphs={"vision": {"max_abs": "n/a"}}, new_tokens=None)))
    rc, out, err = run_cli(capsys, "inspect", a)
    assert rc == 0, err
    assert "[/bold] [red]x" in out and "Traceback" not in err


def test_engine_files_are_confined_and_listed(art_a, tmp_path):
    """engines.graphs.*.file (what the TensorRT backend deserializes) follows the same rules."""
    a = tmp_path / "a"
    shutil.copytree(art_a, a)
    engines = {"tensorrt_version": "10.3.0", "device": "Orin", "compute_capability": "8.7", "precision": "fp16",
               "graphs": {"llm": {"file": "engines/llm.plan", "profiles": ["prefill", "decode"], "quantized": []}},
               "options": {}}
    edit(a, lambda m: m.update(engines=engines))
    with pytest.raises(ArtifactError, match="engines.graphs.llm.file names 'engines/llm.plan', which the manifest's "
                                            "files table does not list"):
        mf.load(a)
    (a / "engines").mkdir()
    (a / "engines" / "llm.plan").write_bytes(b"plan")
    edit(a, lambda m: m["files"].update({"engines/llm.plan": entry(a / "engines" / "llm.plan")}))
    assert mf.load(a).engines.graphs["llm"]["file"] == "engines/llm.plan"
    edit(a, lambda m: m["engines"]["graphs"]["llm"].update(file=str(a / "engines" / "llm.plan")))
    with pytest.raises(ArtifactError, match="engines.graphs.llm.file .*outside the artifact"):
        mf.load(a)
