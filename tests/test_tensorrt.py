"""The TensorRT path: what can be checked without TensorRT, and (marked `tensorrt`) what cannot.

Without TensorRT: the engine-build configuration is checked by inspecting Polygraphy's lazily built
loaders (nothing is called, TensorRT is never imported: a subprocess blocks it); `build --backend
tensorrt`, `engine`, `compare` and `run --backend tensorrt` fail at once with what to install and leave
nothing behind; the runtime backend's KV upload bookkeeping and engine compatibility checks are pure
functions; ONNX Runtime's provider selection falls back with a stated reason.
With TensorRT and an NVIDIA GPU (tests marked `tensorrt`): engines are built, compared with ONNX Runtime
and generate the same greedy tokens.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from vtc.export.cli import main
from vtc.runtime import manifest as mf
from vtc.runtime.errors import ArtifactError, BackendError, UsageError

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "examples" / "shapes.png"
polygraphy = pytest.importorskip("polygraphy", reason="Polygraphy is not installed (pip install 'vtc[dev]')")


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


@functools.lru_cache(maxsize=1)
def _gpu_reason() -> str | None:
    if not _has_tensorrt():
        return "TensorRT is not installed"
    try:
        from vtc.runtime.trt_backend import device_info

        device_info()
    except BackendError as e:  # cuda-python missing, no driver or no device
        return f"no NVIDIA GPU ({e.what})"
    return None


HAS_TRT = _has_tensorrt()


def needs_trt(test):
    """Marked `tensorrt`; skipped with the reason where TensorRT or the GPU is absent."""
    reason = _gpu_reason()
    return pytest.mark.tensorrt(pytest.mark.skipif(reason is not None, reason=reason or "")(test))


without_trt = pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: the missing-TensorRT path cannot run")


@pytest.fixture(scope="module")
def art(artifact_factory) -> Path:
    return artifact_factory("mha-default", "pool", 0.25)


@pytest.fixture(scope="module")
def fastv_art(artifact_factory) -> Path:
    return artifact_factory("mha-default", "fastv", 0.25, method_options={"layer": "1"})


def _shapes(profile) -> dict:
    """Polygraphy Profile -> {input: (min, opt, max)}."""
    return {name: (tuple(st.min), tuple(st.opt), tuple(st.max)) for name, st in profile.items()}


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- build configuration, from the lazy loaders --------------------------------------------------
def test_profiles_follow_the_manifest(art):
    from vtc.export.tensorrt import OPT_TEXT_TOKENS, graph_profiles, trt_profiles

    m = mf.load(art)
    spec, c, lm = m.graphs["llm"], m.compression, m.lm
    profiles = graph_profiles("llm", m.graphs)
    assert profiles == spec.profiles and list(profiles) == ["prefill", "decode"]
    prefill, decode = (_shapes(p) for p in trt_profiles(spec, profiles))
    d, hkv, dh, max_len = lm.hidden_size, lm.num_kv_heads, lm.head_dim, m.text.max_seq_len
    lo, hi = c.k_visual + 1, c.k_visual + m.text.budget
    assert prefill["inputs_embeds"] == ((1, lo, d), (1, min(hi, lo + OPT_TEXT_TOKENS), d), (1, hi, d))
    assert prefill["position_ids"][0] == (1, lo) and prefill["position_ids"][2] == (1, hi)
    assert prefill["past_key.0"] == ((1, hkv, 0, dh),) * 3  # prefill: empty past
    assert decode["inputs_embeds"] == ((1, 1, d),) * 3
    lo = min(64, max_len)  # decode: the cache at its capacity bucket, vtc.runtime.kv_cache.MIN_BUCKET .. max_seq_len
    assert decode["past_value.1"] == ((1, hkv, lo, dh), (1, hkv, min(max_len, lo + OPT_TEXT_TOKENS), dh),
                                      (1, hkv, max_len, dh))
    assert decode["past_lengths"] == ((lm.num_layers,),) * 3 and decode["logits_index"] == ((1,),) * 3
    assert [list(p) for p in (prefill, decode)] == [[t.name for t in spec.inputs]] * 2
    (static,) = trt_profiles(m.graphs["vision"], graph_profiles("vision", m.graphs))
    assert static["pixel_values"].min == static["pixel_values"].max == tuple(m.graphs["vision"].inputs[0].shape)


def test_select_profile_takes_the_prompt_range_of_llm_pre(fastv_art):
    from vtc.export.tensorrt import graph_profiles, trt_profiles

    m = mf.load(fastv_art)
    assert m.graphs["select"].profiles["prefill"]["seq"] == "prompt length"
    resolved = graph_profiles("select", m.graphs)
    assert resolved["prefill"]["seq"] == m.graphs["llm_pre"].profiles["prefill"]["seq"]
    (profile,) = trt_profiles(m.graphs["select"], resolved)
    n, budget = m.compression.n_visual, m.text.budget
    assert profile["last_attn"].min == (1, n + 1) and profile["last_attn"].max == (1, n + budget)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_engine_loader_configuration(art, tmp_path, precision):
    from polygraphy.backend.common import SaveBytes
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath

    from vtc.export.tensorrt import EngineOptions, PoolLimits, engine_loader, graph_profiles

    m = mf.load(art)
    opts = EngineOptions(precision=precision, workspace_gb=2, timing_cache=str(tmp_path / "t.cache"),
                         builder_optimization_level=4).validate()
    loader = engine_loader(art / "llm.onnx", tmp_path / "llm.plan", m.graphs["llm"], graph_profiles("llm", m.graphs), opts)
    assert isinstance(loader, SaveBytes) and loader._path == str(tmp_path / "llm.plan")
    build = loader._bytes
    assert isinstance(build, EngineBytesFromNetwork) and build.timing_cache_path == str(tmp_path / "t.cache")
    assert isinstance(build._network, NetworkFromOnnxPath) and build._network.path == str(art / "llm.onnx")
    cfg = build._config
    assert isinstance(cfg, CreateConfig)
    assert (cfg.fp16, cfg.bf16, cfg.tf32, cfg.int8, cfg.fp8) == (precision == "fp16", precision == "bf16", False,
                                                                    False, False)
    assert isinstance(cfg.memory_pool_limits, PoolLimits) and cfg.memory_pool_limits.workspace == 2 << 30
    assert cfg.timing_cache_path == str(tmp_path / "t.cache") and cfg.builder_optimization_level == 4
    assert len(cfg.profiles) == 2 and cfg.profiles[1]["inputs_embeds"].max[1] == 1


def test_defaults_leave_tensorrt_in_charge(art, tmp_path):
    from vtc.export.tensorrt import EngineOptions, create_config, graph_profiles

    m = mf.load(art)
    cfg = create_config(m.graphs["llm"], graph_profiles("llm", m.graphs), EngineOptions())
    assert cfg.fp16 and cfg.memory_pool_limits is None and cfg.timing_cache_path is None
    assert cfg.builder_optimization_level is None


def _qdq_graph(path: Path, dtype) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    zp = helper.make_tensor("zp", dtype, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])]
    graph = helper.make_graph(nodes, "kv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              initializer=[numpy_helper.from_array(np.array(0.1, np.float32), "s"), zp])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))


@pytest.mark.parametrize("onnx_type, flag", [("INT8", "int8"), ("FLOAT8E4M3FN", "fp8")])
def test_qdq_graphs_enable_explicit_quantization(tmp_path, onnx_type, flag):
    from onnx import TensorProto

    from vtc.export.tensorrt import EngineOptions, check_device, create_config, quantized_types
    from vtc.runtime.manifest import GraphSpec, TensorSpec
    from vtc.runtime.trt_backend import DeviceInfo

    _qdq_graph(tmp_path / "kv.onnx", getattr(TensorProto, onnx_type))
    found = quantized_types(tmp_path / "kv.onnx")
    assert found == {"INT8" if flag == "int8" else "FP8"}
    spec = GraphSpec("kv.onnx", [TensorSpec("x", "float32", [1, 4])], [TensorSpec("y", "float32", [1, 4])], {"static": {}})
    cfg = create_config(spec, {"static": {}}, EngineOptions(), found)
    assert (cfg.int8, cfg.fp8) == (flag == "int8", flag == "fp8") and cfg.fp16
    orin, h100 = DeviceInfo("Orin", "8.7", 0), DeviceInfo("NVIDIA H100", "9.0", 0)
    check_device(found, h100)
    if flag == "fp8":
        with pytest.raises(BackendError, match="compute capability >= 8.9"):
            check_device(found, orin)
    else:
        check_device(found, orin)


def test_engine_options_are_validated():
    from vtc.export.tensorrt import EngineOptions, check_backend

    for bad in (dict(precision="int4"), dict(workspace_gb=0), dict(builder_optimization_level=6),
                dict(timing_cache="/no/such/dir/t.cache")):
        with pytest.raises(UsageError):
            EngineOptions(**bad).validate()
    with pytest.raises(UsageError, match="unknown TensorRT build options"):
        check_backend("onnxruntime", {"fp16": True})
    with pytest.raises(UsageError, match="--backend"):
        check_backend("tvm", {})
    with pytest.raises(UsageError, match="--precision only apply with --backend tensorrt"):
        check_backend("onnxruntime", {"precision": "fp32"})  # validated once, in build.prepare: given flags only
    assert check_backend("onnxruntime", {"precision": None}) is None


def test_loaders_never_import_tensorrt(art, tmp_path):
    """Building every loader (and the whole configuration) with `import tensorrt` made to fail."""
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "tensorrt":
                    raise ImportError("tensorrt is blocked")
        sys.meta_path.insert(0, Block())
        from pathlib import Path
        from vtc.runtime import manifest as mf
        from vtc.export.tensorrt import EngineOptions, engine_loader, graph_profiles
        art, out = Path(sys.argv[1]), Path(sys.argv[2])
        m = mf.load(art)
        for name, spec in m.graphs.items():
            loader = engine_loader(art / spec.file, out / f"{name}.plan", spec, graph_profiles(name, m.graphs),
                                   EngineOptions(workspace_gb=1, timing_cache=str(out / "t.cache")))
            assert repr(loader._bytes._config.memory_pool_limits) == "PoolLimits(workspace=1073741824)"
        assert "tensorrt" not in sys.modules and not list(out.iterdir())
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code, str(art), str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr


# -- no TensorRT here: one clear error, nothing left behind ----------------------------------------
BLOCK_EXPORT = textwrap.dedent("""
    import sys
    class Block:  # export work would import torch; the TensorRT check must come first
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ImportError(f"{name} is blocked: export work started")
    sys.meta_path.insert(0, Block())
    from vtc.export.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@without_trt
def test_build_backend_tensorrt_fails_first_and_leaves_nothing(tiny_checkpoints, tmp_path):
    out = tmp_path / "out" / "art"
    proc = subprocess.run([sys.executable, "-c", BLOCK_EXPORT, "build", "--model", str(tiny_checkpoints["mha-default"]),
                           "--backend", "tensorrt", "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc.stderr)
    assert "TensorRT is not importable" in line and "pip install tensorrt-cu12" in line and "blocked" not in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_trt_flags_need_the_tensorrt_backend(tiny_checkpoints, tmp_path, capsys):
    rc = main(["build", "--model", str(tiny_checkpoints["mha-default"]), "--precision", "fp32", "--output",
               str(tmp_path / "a")])
    assert rc == 2 and "only apply with --backend tensorrt" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "a").exists()


@without_trt
def test_engine_without_tensorrt_leaves_the_artifact_unchanged(art, tmp_path, capsys):
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    before = sorted(p.name for p in copy.iterdir()), (copy / mf.MANIFEST).read_bytes()
    assert main(["engine", str(copy)]) == 1
    assert "TensorRT is not importable" in error_line(capsys.readouterr().err)
    assert (sorted(p.name for p in copy.iterdir()), (copy / mf.MANIFEST).read_bytes()) == before


@without_trt
@pytest.mark.parametrize("argv", [["run", "--backend", "tensorrt", "--image", str(SHAPES), "--prompt", "Hi"],
                                  ["compare", "--backends", "ort,tensorrt"]])
def test_runtime_tensorrt_without_tensorrt_is_one_error(art, capsys, argv):
    rc = main([argv[0], str(art), *argv[1:]])
    line = error_line(capsys.readouterr().err)
    assert rc == 1 and "needs TensorRT" in line and "pip install tensorrt-cu12" in line


def test_tensorrt_runtime_imports_neither_torch_nor_transformers(tmp_path, art):
    from tests.helpers.isolation import run_blocked

    run_blocked("""
        from vtc.runtime.backend import get_backend
        from vtc.runtime.errors import BackendError
        import vtc.runtime.trt_backend, vtc.runtime.pipeline
        try:
            from vtc.runtime.pipeline import VLM
            VLM(sys.argv[1], backend=get_backend("tensorrt")).generate(sys.argv[2], "What is it?", max_new_tokens=2)
        except BackendError as e:  # no TensorRT / cuda-python / GPU here
            assert "install" in str(e).lower() or "GPU" in str(e), e
        assert_still_clean()
    """, art, SHAPES, tmp_path=tmp_path)


def test_compare_two_ort_backends_with_polygraphy(art, tmp_path, capsys):
    """The comparator path end to end on the backends this host has (ONNX Runtime twice: exact)."""
    rc = main(["compare", str(art), "--backends", "ort,ort", "--json", str(tmp_path / "c.json")])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    graphs = {r["graph"] for r in rows}
    assert graphs == {"vision", "llm"} and all(r["ok"] and r["polygraphy_ok"] and r["max_abs"] == 0 for r in rows)
    assert {r["feeds"] for r in rows if r["graph"] == "llm"} == {3}  # prefill + 2 decode steps


# -- runtime pieces that need no GPU ---------------------------------------------------------------
def test_kv_upload_spans():
    from vtc.runtime.trt_backend import KVSync

    kv = KVSync(["hidden_states", "past_key.2", "past_value.2", "past_key.3", "past_lengths"])
    assert kv.layer == {"past_key.2": 2, "past_value.2": 2, "past_key.3": 3} and kv.first == 2
    host = np.zeros((1, 2, 16, 4), np.float32)
    feeds = lambda arr, lengths: {"past_key.2": arr, "past_key.3": arr, "past_lengths": np.array(lengths)}  # noqa: E731
    assert kv.span("past_key.2", feeds(np.zeros((1, 2, 0, 4)), [0, 0])) is None  # prefill: nothing to upload
    assert kv.span("past_key.2", feeds(host, [5, 7])) == (0, 5)  # first decode: the whole prompt
    assert kv.span("past_key.3", feeds(host, [5, 7])) == (0, 7)  # its own layer's length
    assert kv.span("past_key.2", feeds(host, [6, 8])) == (5, 6)  # next step: the one new token
    assert kv.span("past_key.2", feeds(host.copy(), [7, 9])) == (0, 7)  # another array: everything
    kv.span("past_key.2", feeds(np.zeros((1, 2, 0, 4)), [0, 0]))  # a new prompt
    assert kv.span("past_key.2", feeds(host, [3, 3])) == (0, 3)


def test_engines_are_refused_on_another_version_or_gpu():
    from vtc.runtime.trt_backend import DeviceInfo, check_engines

    info = mf.EngineInfo(tensorrt_version="10.3.0.30", device="Orin", compute_capability="8.7", precision="fp16",
                         graphs={}, options={})
    orin = DeviceInfo("Orin", "8.7", 0)
    check_engines(info, "10.3.0", orin)
    with pytest.raises(BackendError, match="TensorRT 10.3.0.30; this is TensorRT 10.7.0.*vtc-export engine"):
        check_engines(info, "10.7.0", orin)
    with pytest.raises(BackendError, match="compute capability 8.7 .*is 9.0.*Rebuild them on this device"):
        check_engines(info, "10.3.0", DeviceInfo("NVIDIA H100", "9.0", 0))
    with pytest.raises(ArtifactError, match="no TensorRT engines"):
        check_engines(None, "10.3.0", orin)


def test_manifest_engines_are_optional(art):
    m = mf.load(art)
    assert m.engines is None
    raw = json.loads(m.to_json())
    raw.pop("engines")
    assert mf.parse(json.dumps(raw)).engines is None  # artifacts written before the field existed
    info = mf.EngineInfo("10.3.0", "Orin", "8.7", "fp16", {"llm": {"file": "engines/llm.plan", "profiles": ["prefill"],
                                                                   "quantized": []}}, {"workspace_gb": None})
    assert mf.parse(replace(m, engines=info).to_json()).engines == info


def test_ort_provider_falls_back_with_a_reason(art, capsys):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDA is installed: no fallback to observe")
    rc = main(["run", str(art), "--image", str(SHAPES), "--prompt", "What is it?", "--provider", "cuda",
               "--max-new-tokens", "2", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and json.loads(out)["token_ids"]
    assert "CUDAExecutionProvider is not available" in " ".join(err.split()) and "onnxruntime-gpu" in err


# -- with TensorRT and a GPU -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_art(art, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("trt") / "art"
    shutil.copytree(art, dst)
    assert main(["engine", str(dst), "--precision", "fp32"]) == 0
    return dst


@needs_trt
def test_engines_are_recorded_and_verified(engine_art):
    m = mf.load(engine_art, check_files=True)
    import tensorrt as trt

    from vtc.runtime.trt_backend import device_info

    assert m.engines.tensorrt_version == trt.__version__
    assert m.engines.compute_capability == device_info().compute_capability
    assert set(m.engines.graphs) == set(m.graphs) and m.engines.graphs["llm"]["profiles"] == ["prefill", "decode"]


@needs_trt
def test_compare_ort_tensorrt(engine_art, tmp_path):
    assert main(["compare", str(engine_art), "--backends", "ort,tensorrt", "--json", str(tmp_path / "c.json")]) == 0


@needs_trt
def test_tensorrt_generates_the_ort_tokens(engine_art):
    from vtc.runtime.backend import get_backend
    from vtc.runtime.pipeline import VLM

    ref = VLM(engine_art).generate(SHAPES, "What shapes are there?", max_new_tokens=16)
    got = VLM(engine_art, backend=get_backend("tensorrt")).generate(SHAPES, "What shapes are there?", max_new_tokens=16)
    assert got.token_ids == ref.token_ids


@needs_trt
def test_build_backend_tensorrt_writes_engines(tiny_checkpoints, tmp_path):
    out = tmp_path / "art"
    assert main(["build", "--model", str(tiny_checkpoints["mha-default"]), "--backend", "tensorrt", "--precision", "fp32",
                 "--output", str(out), "--max-seq-len", "256", "--text-budget", "48"]) == 0
    m = mf.load(out, check_files=True)
    assert m.engines is not None and all((out / e["file"]).is_file() for e in m.engines.graphs.values())
