"""The on-device runtime needs neither torch nor transformers.

Each test runs a fresh interpreter in which a `sys.meta_path` finder makes every import of torch or
transformers (and their submodules) fail, before anything of vtc is imported; then it uses the runtime
(`VLM`) and the `run` / `inspect` commands of the CLI on an artifact built by the session fixture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.isolation import run_blocked

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "examples" / "shapes.png"
PROMPT = "What shapes are in the picture?"

@pytest.fixture(scope="module")
def art(artifact_factory) -> Path:
    return artifact_factory("mha-default", "none")


def test_blocker_blocks(tmp_path):
    """The harness itself: torch really cannot be imported in the blocked interpreter."""
    run_blocked("""
        try:
            import torch  # noqa: F401
        except ImportError as e:
            assert "blocked" in str(e)
        else:
            raise AssertionError("torch was importable")
        try:
            from transformers import LlavaForConditionalGeneration  # noqa: F401
        except ImportError as e:
            assert "blocked" in str(e)
        else:
            raise AssertionError("transformers was importable")
    """, tmp_path=tmp_path)


def test_vlm_generates_without_torch(tmp_path, art):
    proc = run_blocked("""
        import json
        from vtc.runtime.pipeline import VLM

        art, image, prompt = sys.argv[1:4]
        vlm = VLM(art)
        res = vlm.generate(image, prompt, max_new_tokens=4)
        assert_still_clean()
        print(json.dumps({"token_ids": res.token_ids, "stop_reason": res.stop_reason, "text": res.text}))
    """, art, SHAPES, PROMPT, tmp_path=tmp_path)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["stop_reason"] in ("eos", "max_new_tokens")
    assert len(got["token_ids"]) == 4 or got["stop_reason"] == "eos"

    from vtc.runtime.pipeline import VLM  # same result as in this (torch-importing) interpreter

    ref = VLM(art).generate(SHAPES, PROMPT, max_new_tokens=4)
    assert got["token_ids"] == ref.token_ids and got["text"] == ref.text


def test_cli_run_and_inspect_without_torch(tmp_path, art):
    proc = run_blocked("""
        from vtc.export.cli import main

        art, image, prompt = sys.argv[1:4]
        print("@@run", flush=True)
        rc_run = main(["run", art, "--image", image, "--prompt", prompt, "--max-new-tokens", "4", "--json"])
        sys.stdout.flush()
        print("@@inspect", flush=True)
        rc_inspect = main(["inspect", art])
        sys.stdout.flush()
        print("@@inspect-json", flush=True)
        rc_json = main(["inspect", art, "--json"])
        sys.stdout.flush()
        assert_still_clean()
        print("@@end", flush=True)
        sys.exit(rc_run or rc_inspect or rc_json)
    """, art, SHAPES, PROMPT, tmp_path=tmp_path)
    out = proc.stdout
    assert "@@end" in out, proc.stderr
    run_out = out.split("@@run\n", 1)[1].split("@@inspect\n", 1)[0]
    inspect_out = out.split("@@inspect\n", 1)[1].split("@@inspect-json\n", 1)[0]
    json_out = out.split("@@inspect-json\n", 1)[1].split("@@end\n", 1)[0]
    res = json.loads(run_out)
    assert 1 <= len(res["token_ids"]) <= 4 and res["visual_tokens"]["kept"] == 64
    assert "llava" in inspect_out and "vision.onnx" in inspect_out
    assert json.loads(json_out)["schema"] == "vtc.artifact"
    assert "error" not in proc.stderr.lower()


def test_cli_profile_without_torch(tmp_path, art):
    """`profile` (table, JSON, CSV, PNG; tegrastats/NVML probes) is part of the on-device runtime."""
    proc = run_blocked("""
        import json
        from vtc.export.cli import main

        art, out = sys.argv[1:3]
        rc = main(["profile", art, "--runs", "2", "--warmup", "1", "--max-new-tokens", "3",
                   "--json", out + "/p.json", "--csv", out + "/p.csv", "--plot", out + "/p.png"])
        sys.stdout.flush()
        assert_still_clean()
        assert json.load(open(out + "/p.json"))["metrics"]["ttft_ms"]["n"] == 2
        sys.exit(rc)
    """, art, tmp_path, tmp_path=tmp_path)
    assert "TTFT" in proc.stdout and (tmp_path / "p.png").stat().st_size > 0 and (tmp_path / "p.csv").is_file()


def test_sessions_share_one_thread_pool_once_asked(tmp_path, art, artifact_factory):
    """Opening an artifact leaves ONNX Runtime's per-session pools alone; after shared_thread_pool(n) every graph
    runs on that one pool (a single-LLM artifact and an in-LLM method's segments), a backend asking for another
    size is refused, and the tokens are the same in every case."""
    fastv = artifact_factory("mqa-layer-1", "fastv", 0.25, method_options={})
    proc = run_blocked("""
        import json
        from vtc.runtime.backend import get_backend, shared_thread_pool
        from vtc.runtime.errors import UsageError
        from vtc.runtime.pipeline import VLM

        out = {}
        def gen(a, threads):
            vlm = VLM(a, backend=get_backend(threads=threads))
            res = vlm.generate(sys.argv[3], sys.argv[4], max_new_tokens=4)
            out.setdefault(a, []).append([vlm.backend.describe()["thread_pool"], res.token_ids])
        for a in sys.argv[1:3]:
            gen(a, 2)
        shared_thread_pool(1)
        shared_thread_pool(1)  # asking again for the same size is fine
        for a in sys.argv[1:3]:
            gen(a, 1)
            gen(a, None)
            try:
                VLM(a, backend=get_backend(threads=2))
            except UsageError as e:
                assert "one shared pool of 1 threads" in str(e), e
            else:
                raise AssertionError("a second pool size was accepted")
        assert_still_clean()
        print(json.dumps(out))
    """, art, fastv, SHAPES, PROMPT, tmp_path=tmp_path)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got) == 2
    for runs in got.values():
        assert [pool for pool, _ in runs] == ["per-session", "shared", "shared"]
        assert runs[0][1] == runs[1][1] == runs[2][1]


def test_profile_command_runs_on_the_shared_pool(tmp_path, art):
    """The commands that own their process (run, profile, eval, sweep) make the shared pool at --threads; the
    report says so. (The rest of the suite sets VTC_SHARED_POOL=0, since it runs many commands in one process.)"""
    proc = run_blocked("""
        import json, os
        os.environ.pop("VTC_SHARED_POOL", None)
        from vtc.export.cli import main

        rc = main(["profile", sys.argv[1], "--runs", "1", "--warmup", "0", "--max-new-tokens", "2", "--threads", "1",
                   "--json", "report.json"])
        assert rc == 0, rc
        assert_still_clean()
        host = json.load(open("report.json"))["host"]
        print(json.dumps([host["thread_pool"], host["threads"]]))
    """, art, tmp_path=tmp_path)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["shared", 1]
