"""Output placement (vtc.export.placement): what `build --force` may delete, an output that appears while a
build runs, concurrent builds, SIGTERM/SIGKILL leftovers, `vtc-export engine`'s swap, sweep's setup.

Issue 15, defects 1 (--force trusts any manifest.json), 2 (the final move replaces whatever is there),
5 (leftovers after SIGTERM/SIGKILL; `sweep` on a bad model leaves its state file); acceptance 4.
Builds run the real console script in a subprocess when a signal or a race is involved.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.subprocs import vtc_export_cmd, wait_for

from vtc.export import placement
from vtc.export.cli import main
from vtc.runtime import manifest as mf
from vtc.runtime.errors import UsageError

FAST = ("--max-seq-len", "256", "--text-budget", "48", "--parity-tokens", "2")


# -- helpers ---------------------------------------------------------------------------------------
def copy_art(art: Path, dst: Path) -> Path:
    shutil.copytree(art, dst)
    return dst


def run_cli(capsys, *argv) -> tuple[int, str]:
    """(exit code, the one `error:` line or '') of `vtc-export ARGV` run in-process."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    _out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) <= 1, err
    return rc, (lines[0] if lines else "")


def snapshot(d: Path) -> dict:
    """Every entry under d (not following links) -> sha256 of a file, the target of a link, or 'dir'."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = p.relative_to(d).as_posix()
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(parent: Path) -> list[str]:
    """What a build may leave next to its output: locks, partial directories, kept or moved-aside ones."""
    return sorted(p.name for p in parent.iterdir()
                  if p.name.endswith(".lock") or any(s in p.name for s in (".partial-", ".old-", ".kept-", ".vtc-built-")))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_partial(parent: Path, name: str, *, pid: int, output: str | None = None, host: str | None = None,
                 tag: str = "x") -> Path:
    """A partial directory as vtc writes it (owner record), for a process `pid`."""
    p = parent / f".{name}.partial-{tag}"
    (p / placement.NEW).mkdir(parents=True)
    (p / placement.NEW / "vision.onnx").write_bytes(b"half")
    (p / placement.OWNER).write_text(json.dumps({"schema": placement.OWNER_SCHEMA, "pid": pid,
                                                 "host": host or socket.gethostname(), "start": None,
                                                 "output": output or name}))
    return p


def start_build(out: Path, ckpt: Path, log: Path, *extra) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as errf:
        return subprocess.Popen([*vtc_export_cmd(), "build", "--model", str(ckpt), "--output", str(out), *FAST, *extra],
                                stdout=subprocess.DEVNULL, stderr=errf, env=env, cwd=out.parent)


def exporting(parent: Path, name: str):
    """The build's partial directory once its first exported file is there (the export is under way)."""
    def cond():
        for p in parent.glob(f".{name}.partial-*"):
            new = p / placement.NEW
            if new.is_dir() and any(new.iterdir()):
                return p
        return None
    return cond


def finish(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


# -- defect 1: what --force may replace ---------------------------------------------------------------
def test_force_refuses_a_directory_with_a_fake_manifest(capsys, tmp_path, ckpt):
    """`mkdir p; echo '{}' >p/manifest.json; echo x >p/app.js; vtc-export build -o p --force` deleted app.js."""
    p = tmp_path / "p"
    p.mkdir()
    (p / "manifest.json").write_text("{}\n")
    (p / "app.js").write_text("x\n")
    before = snapshot(p)
    rc, line = run_cli(capsys, "build", "--model", ckpt, "-o", p, "--force")
    assert rc == 2 and "not a vtc artifact" in line and "--force" in line, line
    assert snapshot(p) == before and (p / "app.js").read_text() == "x\n"
    assert leftovers(tmp_path) == []


def test_force_refuses_an_artifact_holding_user_files(capsys, tmp_path, ckpt, art):
    out = copy_art(art, tmp_path / "art")
    (out / "app.js").write_text("mine")
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("mine too")
    outside = tmp_path / "outside.txt"
    outside.write_text("not vtc's")
    (out / "link").symlink_to(outside)
    before = snapshot(out)
    rc, line = run_cli(capsys, "build", "--model", ckpt, "-o", out, "--force")
    assert rc == 2, line
    for name in ("app.js", "notes/todo.txt", "link (symbolic link)", "Move them out"):
        assert name in line, line
    assert snapshot(out) == before and outside.read_text() == "not vtc's"
    assert leftovers(tmp_path) == []


def test_force_refuses_a_listed_file_replaced_by_a_symlink(capsys, tmp_path, ckpt, art):
    out = copy_art(art, tmp_path / "art")
    target = tmp_path / "precious.onnx"
    target.write_bytes((out / "vision.onnx").read_bytes())
    (out / "vision.onnx").unlink()
    (out / "vision.onnx").symlink_to(target)
    rc, line = run_cli(capsys, "build", "--model", ckpt, "-o", out, "--force")
    assert rc == 2 and "vision.onnx (symbolic link)" in line, line
    assert target.is_file() and (out / "vision.onnx").is_symlink()


@pytest.mark.parametrize("case", ["dot", "symlink", "no-force", "file-parent"])
def test_output_paths_refused_before_any_work(capsys, tmp_path, ckpt, art, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    if case == "dot":
        out, expect = ".", "names no directory"
    elif case == "symlink":
        real = copy_art(art, tmp_path / "real")
        out, expect = tmp_path / "link", "symbolic link"
        out.symlink_to(real)
    elif case == "no-force":
        out, expect = copy_art(art, tmp_path / "art"), "already exists"
    else:
        (tmp_path / "afile").write_text("x")
        out, expect = tmp_path / "afile" / "art", "is a file"
    before = snapshot(tmp_path)
    rc, line = run_cli(capsys, "build", "--model", ckpt, "-o", out, *(["--force"] if case != "no-force" else []))
    assert rc == 2 and expect in line, line
    assert snapshot(tmp_path) == before


def test_force_replaces_a_real_artifact(tmp_path, ckpt, art, monkeypatch):
    """Swap semantics with a stand-in writer (a real --force build: the SIGKILL test below)."""
    from tests.helpers.builds import nullstep
    from vtc.export import build as build_mod

    out = copy_art(art, tmp_path / "art")
    (out / "engines").mkdir()  # an empty directory holds nothing vtc would delete without saying so
    monkeypatch.setattr(build_mod, "_write_artifact", _stub_writer(lambda: None))
    build_mod.build(build_mod.BuildArgs(model=str(ckpt), method="none", output=str(out), force=True,
                                        max_seq_len=256, text_budget=48), nullstep)
    assert snapshot(out) == {"vision.onnx": hashlib.sha256(b"new").hexdigest()}
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# -- defect 2: the output appears or changes while the build runs -------------------------------------
def test_output_created_during_the_build_is_left_alone(tmp_path, ckpt):
    """`vtc-export build -o X & sleep 5; mkdir X; echo w >X/f; wait` deleted X/f and exited 0."""
    x, log = tmp_path / "X", tmp_path / "stderr.txt"
    proc = start_build(x, ckpt, log)
    try:
        wait_for(exporting(tmp_path, "X"), proc, "the export to start", log)
        x.mkdir()
        (x / "f").write_text("w\n")
        rc = proc.wait(timeout=600)
    finally:
        finish(proc)
    err = log.read_text()
    assert rc == 2 and "Traceback" not in err, err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "appeared while the build ran" in line[0], err
    assert snapshot(x) == {"f": hashlib.sha256(b"w\n").hexdigest()}
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("X.vtc-built-")]
    assert len(kept) == 1 and str(kept[0]) in line[0]  # the finished build, complete, under a visible name
    mf.load(kept[0], check_files=True)
    assert [n for n in leftovers(tmp_path) if not n.startswith("X.vtc-built-")] == []


def _stub_writer(during):
    """A stand-in for build._write_artifact: one file, and `during()` runs while "the build" is under way."""
    def write(tmp, bp, step, cache):
        (tmp / "vision.onnx").write_bytes(b"new")
        during()
        return None, None
    return write


@pytest.mark.parametrize("change", ["replaced", "file-added"])
def test_force_output_changed_during_the_build_is_left_alone(tmp_path, ckpt, art, monkeypatch, change):
    from tests.helpers.builds import nullstep
    from vtc.export import build as build_mod

    out = copy_art(art, tmp_path / "art")
    old = snapshot(out)

    def during():
        if change == "replaced":
            out.rename(tmp_path / "moved")
            out.mkdir()
            (out / "mine.txt").write_text("mine")
        else:
            (out / "mine.txt").write_text("mine")

    monkeypatch.setattr(build_mod, "_write_artifact", _stub_writer(during))
    args = build_mod.BuildArgs(model=str(ckpt), method="none", output=str(out), force=True, max_seq_len=256,
                               text_budget=48)
    with pytest.raises(UsageError, match="replaced by something else" if change == "replaced" else "mine.txt"):
        build_mod.build(args, nullstep)
    assert (out / "mine.txt").read_text() == "mine"
    if change == "replaced":
        assert snapshot(tmp_path / "moved") == old and sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    else:
        assert snapshot(out) == {**old, "mine.txt": hashlib.sha256(b"mine").hexdigest()}
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("art.vtc-built-")]
    assert len(kept) == 1 and (kept[0] / "vision.onnx").read_bytes() == b"new"
    assert [n for n in leftovers(tmp_path) if not n.startswith("art.vtc-built-")] == []


def test_second_build_to_the_same_output_fails_at_once_and_sigterm_cleans_up(capsys, tmp_path, ckpt, art):
    """Two concurrent builds to one path both exited 0 (the later silently won). Now the second fails at
    once; then SIGTERM mid-build: exit 130, no partial directory or lock left, the old artifact intact."""
    out, log = copy_art(art, tmp_path / "art"), tmp_path / "stderr.txt"
    old = snapshot(out)
    proc = start_build(out, ckpt, log, "--force", "--method", "pool")
    try:
        wait_for(exporting(tmp_path, "art"), proc, "the export to start", log)
        t0 = time.perf_counter()
        rc, line = run_cli(capsys, "build", "--model", ckpt, "-o", out, "--force", *FAST)
        second_s = time.perf_counter() - t0
        assert rc == 2 and f"another vtc-export build (pid {proc.pid})" in line, line
        assert second_s < 30, second_s  # refused in validation, before the model is loaded
        assert proc.poll() is None  # the first build is not disturbed
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=300)
    finally:
        finish(proc)
    err = log.read_text()
    assert rc == 130 and "interrupted" in err and "Traceback" not in err, err
    assert snapshot(out) == old
    mf.load(out, check_files=True)
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["art", "stderr.txt"]


# -- defect 5 / acceptance 4: SIGKILL leftovers ---------------------------------------------------------
def test_sigkill_mid_build_leftovers_are_removed_by_the_next_build(capsys, tmp_path, ckpt, art):
    """SIGKILL mid-export leaves the partial directory and the lock file (nothing can catch SIGKILL) and
    the old artifact as it was; the next build removes them, replaces the artifact (--force) and succeeds."""
    out, log = copy_art(art, tmp_path / "art"), tmp_path / "stderr.txt"
    old = snapshot(out)
    proc = start_build(out, ckpt, log, "--force")
    try:
        partial = wait_for(exporting(tmp_path, "art"), proc, "the export to start", log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        finish(proc)
    assert partial.is_dir() and (tmp_path / ".art.lock").exists() and snapshot(out) == old
    rc, line = run_cli(capsys, "build", "--model", ckpt, "-o", out, "--force", "--method", "pool", *FAST)
    assert rc == 0, line
    assert mf.load(out, check_files=True).compression.method == "pool"
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["art", "stderr.txt"]


def test_only_dead_builds_partials_are_removed(tmp_path):
    """Never a partial directory without vtc's owner record, of a live process, of another host, or of
    another output; a stale lock file (killed owner) does not block."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        gone = dead_pid()
        dead = fake_partial(tmp_path, "art", pid=gone, tag="dead")
        live = fake_partial(tmp_path, "art", pid=sleeper.pid, tag="live")
        host = fake_partial(tmp_path, "art", pid=gone, host="another-host", tag="host")
        other = fake_partial(tmp_path, "art", pid=gone, output="art2", tag="other")
        foreign = tmp_path / ".art.partial-foreign"
        foreign.mkdir()
        (foreign / "data.bin").write_bytes(b"someone else's")
        broken = fake_partial(tmp_path, "art", pid=gone, tag="broken")
        (broken / placement.OWNER).write_text("{not json")
        (tmp_path / ".art.lock").write_text(json.dumps({"schema": placement.LOCK_SCHEMA, "pid": gone}))
        with placement.claim_output(tmp_path / "art", None, False) as claim:
            assert claim.path.is_dir()
        assert not dead.exists()
        for p in (live, host, other, foreign, broken):
            assert p.is_dir() and any(p.rglob("*")), p
        assert not (tmp_path / ".art.lock").exists() and not (tmp_path / "art").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_killed_while_swapping_restores_the_old_artifact(tmp_path, art):
    """SIGKILL after the old artifact was moved aside and before the new one was renamed in: the next build
    puts the old one back (and, without --force, then refuses to replace it)."""
    out = tmp_path / "art"
    p = fake_partial(tmp_path, "art", pid=dead_pid())
    copy_art(art, p / placement.OLD)
    (p / placement.OLD_LIST).write_text(json.dumps(sorted(mf.load(art).files) + [mf.MANIFEST]))
    with pytest.raises(UsageError, match="already exists"):
        placement.claim_output(out, None, False)
    assert snapshot(out) == snapshot(art) and not p.exists() and leftovers(tmp_path) == []


def test_killed_after_swapping_deletes_only_listed_files(tmp_path, art, capsys):
    """SIGKILL after the new artifact was renamed in: the moved-aside old one is deleted file by file, only
    what its manifest listed; anything else is kept under a visible name and named in a warning."""
    out = copy_art(art, tmp_path / "art")
    p = fake_partial(tmp_path, "art", pid=dead_pid())
    shutil.rmtree(p / placement.NEW)  # renamed into place before the kill
    old = copy_art(art, p / placement.OLD)
    (old / "late.txt").write_text("written into the old directory meanwhile")
    (p / placement.OLD_LIST).write_text(json.dumps(sorted(mf.load(art).files) + [mf.MANIFEST, "../../escape"]))
    (tmp_path / "escape").write_text("outside")
    with placement.claim_output(out, None, True):
        pass
    kept = [d for d in tmp_path.iterdir() if d.name.startswith("art.kept-")]
    assert len(kept) == 1 and snapshot(kept[0]) == {"late.txt": hashlib.sha256(b"written into the old directory "
                                                                             b"meanwhile").hexdigest()}
    assert "late.txt" in capsys.readouterr().err
    assert (tmp_path / "escape").read_text() == "outside" and snapshot(out) == snapshot(art) and not p.exists()


def test_remove_listed_never_follows_symlinks(tmp_path):
    root, outside = tmp_path / "old", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "x.onnx").write_text("keep")
    (outside / "y.onnx").write_text("keep")
    (root / "a.onnx").write_text("vtc's")
    (root / "sub" / "b.onnx").write_text("vtc's")
    (root / "x.onnx").symlink_to(outside / "x.onnx")  # a listed name that is a link: left
    (root / "linked").symlink_to(outside)  # a listed path through a linked directory: not followed
    left = placement.remove_listed(root, ["a.onnx", "sub/b.onnx", "x.onnx", "linked/y.onnx", "../outside/x.onnx"])
    assert sorted(left) == ["linked (symbolic link)", "x.onnx (symbolic link)"]
    assert snapshot(outside) == {"x.onnx": hashlib.sha256(b"keep").hexdigest(),
                                 "y.onnx": hashlib.sha256(b"keep").hexdigest()}
    assert not (root / "a.onnx").exists() and not (root / "sub").exists()


def test_final_rename_never_replaces_even_an_empty_directory(tmp_path):
    """os.rename would silently replace an empty directory that appeared at the last moment."""
    src, dst = tmp_path / "new", tmp_path / "out"
    src.mkdir()
    (src / "a").write_text("a")
    dst.mkdir()
    with pytest.raises(FileExistsError):
        placement.rename_noreplace(src, dst)
    assert (src / "a").exists() and dst.is_dir() and not any(dst.iterdir())


def test_a_lock_file_vtc_did_not_write_is_never_overwritten(tmp_path):
    (tmp_path / ".art.lock").write_text("the user's own file")
    with pytest.raises(UsageError, match="not a vtc lock file"):
        placement.claim_output(tmp_path / "art", None, False)
    assert (tmp_path / ".art.lock").read_text() == "the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.lock"]


# -- vtc-export engine: art/engines swapped through the same claim --------------------------------------
def test_engine_swap_replaces_listed_engines_and_the_manifest_last(tmp_path, art):
    a = copy_art(art, tmp_path / "art")
    (a / "engines").mkdir()
    (a / "engines" / "vision.plan").write_bytes(b"old engine")
    with placement.claim_inside(a, "engines", lambda: {"vision.plan"}, a / mf.MANIFEST) as claim:
        (claim.path / "vision.plan").write_bytes(b"new engine")
        claim.commit(staged_manifest='{"staged": true}')
    assert (a / "engines" / "vision.plan").read_bytes() == b"new engine"
    assert (a / mf.MANIFEST).read_text() == '{"staged": true}'
    assert sorted(p.name for p in a.iterdir() if p.name.startswith(".")) == []


def test_engine_swap_refuses_unlisted_files_and_an_interrupted_one_leaves_the_artifact(tmp_path, art):
    a = copy_art(art, tmp_path / "art")
    (a / "engines").mkdir()
    (a / "engines" / "vision.plan").write_bytes(b"old engine")
    (a / "engines" / "my-notes.txt").write_text("mine")
    before = snapshot(a)
    with pytest.raises(UsageError, match="my-notes.txt"):
        placement.claim_inside(a, "engines", lambda: {"vision.plan"}, a / mf.MANIFEST)
    (a / "engines" / "my-notes.txt").unlink()
    before = snapshot(a)
    with pytest.raises(KeyboardInterrupt):
        with placement.claim_inside(a, "engines", lambda: {"vision.plan"}, a / mf.MANIFEST) as claim:
            (claim.path / "vision.plan").write_bytes(b"half")
            raise placement.BuildInterrupted("SIGTERM received")
    assert snapshot(a) == before


def test_engine_killed_after_the_swap_rolls_the_manifest_forward(tmp_path, art):
    a = copy_art(art, tmp_path / "art")
    (a / "engines").mkdir()
    (a / "engines" / "vision.plan").write_bytes(b"new engine")  # already swapped in
    p = fake_partial(a, "engines", pid=dead_pid())
    shutil.rmtree(p / placement.NEW)
    (p / placement.OLD).mkdir()
    (p / placement.OLD / "vision.plan").write_bytes(b"old engine")
    (p / placement.OLD_LIST).write_text(json.dumps(["vision.plan"]))
    (p / placement.STAGED).write_text('{"staged": true}')
    with placement.claim_inside(a, "engines", lambda: {"vision.plan"}, a / mf.MANIFEST):
        pass
    assert (a / mf.MANIFEST).read_text() == '{"staged": true}' and not p.exists()
    assert (a / "engines" / "vision.plan").read_bytes() == b"new engine"


def test_engine_command_swaps_engines_in_and_sigterm_leaves_the_artifact(tmp_path, art, monkeypatch):
    """build_engines_in_place end to end with stand-ins for TensorRT's lint and build (no GPU here): the engines
    and the manifest that lists them land together; a second run replaces them; an interrupted one
    (SIGTERM mid-build) leaves the artifact as it was, with nothing extra in it."""
    from tests.helpers.builds import nullstep
    from vtc.export import lint
    from vtc.export import tensorrt as trt

    a = copy_art(art, tmp_path / "art")
    runs = []

    def fake_build_engines(directory, graphs, options, step, out_dir=None):
        runs.append(out_dir)
        for name in graphs:
            (out_dir / f"{name}.plan").write_bytes(f"engine {len(runs)}".encode())
        if len(runs) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        return mf.EngineInfo(tensorrt_version="0", device="stand-in", compute_capability="0.0", precision="fp16",
                             graphs={n: {"file": f"engines/{n}.plan", "profiles": [], "quantized": []} for n in graphs},
                             options={})

    monkeypatch.setattr(trt, "build_engines", fake_build_engines)
    monkeypatch.setattr(trt, "require_tensorrt", lambda: type("FakeTensorRT", (), {"__version__": "10.1.0"}))
    monkeypatch.setattr(lint, "lint_graphs", lambda *_, **__: type("Clean", (), {"raise_if_errors": lambda self: None})())
    for i in (1, 2):
        info = trt.build_engines_in_place(a, trt.EngineOptions(), nullstep)
        m = mf.load(a, check_files=True)
        assert m.engines == info and (a / "engines" / "vision.plan").read_bytes() == f"engine {i}".encode()
        assert [p.name for p in a.iterdir() if p.name.startswith(".")] == []
    before = snapshot(a)
    with pytest.raises(placement.BuildInterrupted):
        trt.build_engines_in_place(a, trt.EngineOptions(), nullstep)
    assert snapshot(a) == before and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# -- sweep: nothing written for a bad model; a killed sweep's temporary state file ----------------------
def test_sweep_on_a_bad_model_writes_nothing(capsys, tmp_path):
    bad = tmp_path / "notamodel"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "bert"}))
    out = tmp_path / "sw"
    rc, line = run_cli(capsys, "sweep", "--model", bad, "--output", out, "--methods", "pool", "--ratios", "1.0,0.5")
    assert rc != 0 and "not a vision-language checkpoint" in line, line
    assert not out.exists()


def test_dead_sweep_state_temp_files_are_removed(tmp_path):
    from vtc.export.sweep import STATE

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead = tmp_path / f".{STATE}.tmp-{dead_pid()}"
        live = tmp_path / f".{STATE}.tmp-{sleeper.pid}"
        other = tmp_path / f".{STATE}.tmp-notapid"
        for p in (dead, live, other):
            p.write_text("{}")
        assert placement.remove_dead_pid_files(tmp_path, f".{STATE}.tmp-") == [dead]
        assert not dead.exists() and live.exists() and other.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_sigterm_raises_once_the_cleanup_finishes_and_handlers_are_restored():
    prev = signal.getsignal(signal.SIGTERM)
    cleaned = False
    with pytest.raises(placement.BuildInterrupted):
        with placement.signals_raise():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # a second one during the cleanup is ignored
                time.sleep(0.1)
                cleaned = True
    assert cleaned and signal.getsignal(signal.SIGTERM) is prev
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # nohup-style: an ignored signal stays ignored
    try:
        with placement.signals_raise():
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, prev)
