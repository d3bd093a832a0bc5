"""`vtc.runtime.manifest.parse` is strict: unknown or missing keys, wrong types and other schema versions fail
with one-line ArtifactErrors that say what to do; `parse(m.to_json()) == m`."""

from __future__ import annotations

import copy
import json

import pytest

from vtc.runtime import manifest as mf
from vtc.runtime.errors import ArtifactError
from vtc.runtime.preprocess import ImagePreprocessor


def sample() -> mf.Manifest:
    """A small but complete, valid manifest (every nested dataclass, optional and default fields): it passes
    vtc.runtime.artifact_check.validate, so each test below changes exactly one thing."""
    t = mf.TensorSpec
    kv = [t(f"past_{kind}.{i}", "float32", [1, 2, "past_seq", 16]) for i in range(2) for kind in ("key", "value")]
    present = [t(f"present_{kind}.{i}", "float32", [1, 2, "seq", 16]) for i in range(2) for kind in ("key", "value")]
    preprocess = ImagePreprocessor.from_config({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 112},
                                                "crop_size": {"height": 112, "width": 112}, "image_mean": [0.5] * 3})
    return mf.Manifest(
        schema=mf.SCHEMA, schema_version=mf.SCHEMA_VERSION, vtc_version="0.1.0", created_utc="2025-01-01T00:00:00+00:00",
        build_args={"model": "/ckpt", "method": "pool", "ratio": 0.25, "method_options": {}, "force": False},
        model=mf.ModelInfo(architecture="llava", source="/ckpt", demo=False, image_token="<image>", image_token_id=4),
        compression=mf.CompressionInfo(method="pool", ratio=0.25, options={"window": 2}, n_visual=64, k_visual=16,
                                       grid=[8, 8], has_cls=False, stage="vision", work_layer=None,
                                       kv_visual_per_layer=[16, 16]),
        lm=mf.LMInfo(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, hidden_size=64, vocab_size=200),
        text=mf.TextInfo(budget=48, max_seq_len=256, eos_token_ids=[2], chat_template="chat_template.jinja"),
        kv_cache=mf.KVCacheInfo(dtype="float32", layer_dtypes=["float32", "float32"], layout="[layer][key|value]",
                                bytes_per_token=512, bytes_total=131072, scales=None, scale_source=None,
                                fallback_layers=[], accuracy={}),
        graphs={
            "vision": mf.GraphSpec(file="vision.onnx", inputs=[t("pixel_values", "float32", [1, 3, 112, 112])],
                                   outputs=[t("image_embeds", "float32", [1, 16, 64]), t("kept_index", "int64", [1, 16]),
                                            t("token_map", "int64", [1, 64])],
                                   profiles={"static": {}}),
            "llm": mf.GraphSpec(file="llm.onnx",
                                inputs=[t("inputs_embeds", "float32", [1, "seq", 64]), t("position_ids", "int64", [1, "seq"]),
                                        t("past_lengths", "int64", [2]), t("logits_index", "int64", [1]), *kv],
                                outputs=[t("logits", "float32", [1, 200]), *present],
                                profiles={"prefill": {"seq": [17, 64], "past_seq": 0}, "decode": {"seq": 1, "past_seq": 256}}),
        },
        embeddings={"file": "embed_tokens.npy", "dtype": "float32", "shape": [200, 64]},
        preprocess=preprocess.to_dict(),
        parity={"ok": True, "graphs": {"vision": {"max_abs": 1e-6}}},
        files={"vision.onnx": {"sha256": "0" * 64, "bytes": 10}},
    )


def raw() -> dict:
    return json.loads(sample().to_json())


def parse_raw(d) -> mf.Manifest:
    return mf.parse(json.dumps(d), "manifest.json")


def fails(d, *contains: str) -> str:
    with pytest.raises(ArtifactError) as exc:
        parse_raw(d)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert exc.value.fix, "every error says what to do"
    for s in contains:
        assert s in msg, f"{s!r} not in {msg!r}"
    return msg


# -- round trip ------------------------------------------------------------------------------------
def test_round_trip():
    m = sample()
    back = mf.parse(m.to_json())
    assert back == m
    assert back.to_json() == m.to_json()
    assert isinstance(back.graphs["vision"], mf.GraphSpec) and isinstance(back.graphs["vision"].inputs[0], mf.TensorSpec)


def test_round_trip_optional_and_default_fields():
    d = raw()
    d["text"]["chat_template"] = None
    del d["graphs"]["vision"]["profiles"]  # has a default
    m = parse_raw(d)
    assert m.text.chat_template is None and m.graphs["vision"].profiles == {}
    assert mf.parse(m.to_json()) == m


def test_int_accepted_for_float():
    d = raw()
    d["compression"]["ratio"] = 1
    m = parse_raw(d)
    assert m.compression.ratio == 1.0 and isinstance(m.compression.ratio, float)


def test_round_trip_real_artifact(artifact_factory):
    art = artifact_factory("mha-default", "none")
    text = (art / mf.MANIFEST).read_text()
    m = mf.parse(text)
    assert mf.parse(m.to_json()) == m
    assert m.to_json() == text  # what the build wrote is exactly what to_json writes
    assert set(m.files) == {p.relative_to(art).as_posix() for p in art.rglob("*") if p.is_file()} - {mf.MANIFEST}


# -- unknown and missing keys ----------------------------------------------------------------------
@pytest.mark.parametrize("path, where", [
    ((), "manifest root"),
    (("model",), "manifest model"),
    (("text",), "manifest text"),
    (("graphs", "vision"), "manifest graphs.vision"),
    (("graphs", "llm", "inputs", 0), "manifest graphs.llm.inputs[0]"),
])
def test_unknown_key(path, where):
    d = raw()
    node = d
    for k in path:
        node = node[k]
    node["surprise"] = 1
    fails(d, where, "unknown keys ['surprise']", "rebuild")


@pytest.mark.parametrize("path, key, where", [
    ((), "lm", "manifest root"),
    ((), "files", "manifest root"),
    (("compression",), "k_visual", "manifest compression"),
    (("graphs", "vision", "outputs", 1), "dtype", "manifest graphs.vision.outputs[1]"),
])
def test_missing_key(path, key, where):
    d = raw()
    node = d
    for k in path:
        node = node[k]
    del node[key]
    fails(d, where, f"missing keys ['{key}']", "rebuild")


def test_free_form_dicts_accept_any_keys():
    """build_args, options, preprocess, parity, embeddings and files are free-form by design."""
    d = raw()
    d["build_args"]["new_flag"] = True
    d["compression"]["options"]["other"] = 3
    d["parity"]["extra"] = [1, 2]
    assert parse_raw(d).build_args["new_flag"] is True


# -- wrong types -----------------------------------------------------------------------------------
@pytest.mark.parametrize("path, value, contains", [
    (("lm", "num_layers"), "2", "lm.num_layers should be int, got str"),
    (("lm", "num_layers"), 2.0, "lm.num_layers should be int, got float"),
    (("lm", "num_layers"), True, "lm.num_layers should be int, got bool"),
    (("model", "demo"), "no", "model.demo should be bool, got str"),
    (("compression", "ratio"), "0.25", "compression.ratio should be float, got str"),
    (("compression", "grid"), "8x8", "compression.grid should be list, got str"),
    (("text", "chat_template"), 5, "text.chat_template should be str, got int"),
    (("text", "eos_token_ids"), 2, "text.eos_token_ids should be list, got int"),
    (("model",), [], "manifest field model must be an object"),
    (("graphs",), [], "graphs should be dict, got list"),
    (("graphs", "vision"), "vision.onnx", "manifest field graphs.vision must be an object"),
    (("graphs", "vision", "inputs"), {}, "graphs.vision.inputs should be list, got dict"),
    (("files",), None, "files should be dict, got NoneType"),
    (("vtc_version",), 1, "vtc_version should be str, got int"),
])
def test_wrong_type(path, value, contains):
    d = raw()
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    fails(d, contains)


# -- schema and version ----------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "{", "[1, 2", "null x"])
def test_invalid_json(text):
    with pytest.raises(ArtifactError) as exc:
        mf.parse(text, "a/manifest.json")
    assert "a/manifest.json is not valid JSON" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("doc", [[], "vtc", 1, None, {"schema": "other.artifact", "schema_version": 1},
                                 {"schema_version": 1}])
def test_not_a_vtc_manifest(doc):
    d = copy.deepcopy(raw()) if isinstance(doc, dict) else doc
    if isinstance(doc, dict):
        d.pop("schema")
        d.update(doc)
    fails(d, "is not a vtc artifact manifest")


def test_newer_version_says_upgrade():
    d = raw()
    d["schema_version"] = mf.SCHEMA_VERSION + 1
    msg = fails(d, f"schema version {mf.SCHEMA_VERSION + 1}", f"reads versions 2, {mf.SCHEMA_VERSION}", "Upgrade vtc")
    assert "Rebuild" not in msg


@pytest.mark.parametrize("version", [1, -1, "1", None, 1.5])  # 2 is still read (tests/test_manifest_v2.py)
def test_older_or_bogus_version_says_rebuild(version):
    d = raw()
    d["schema_version"] = version
    msg = fails(d, "schema version", "Rebuild the artifact")
    assert "Upgrade" not in msg


def test_missing_version():
    d = raw()
    del d["schema_version"]
    fails(d, "schema version None", "Rebuild")


def test_bool_version_rejected():
    d = raw()
    d["schema_version"] = True  # a bool is never a schema version (True == 1 in Python)
    fails(d, "schema version True")


# -- bounds and consistency (vtc.runtime.artifact_check.validate) ----------------------------------
def _set(d, path, value):
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


@pytest.mark.parametrize("path, value, contains", [
    (("lm", "num_heads"), 2 ** 63, "lm.num_heads is 9223372036854775808; it must be in [1, 4096]"),  # issue 15's audit
    (("lm", "num_layers"), 0, "lm.num_layers"),
    (("lm", "num_kv_heads"), 3, "does not divide lm.num_heads"),
    (("lm", "head_dim"), -16, "lm.head_dim"),
    (("lm", "vocab_size"), 2 ** 40, "lm.vocab_size"),
    (("lm", "rope"), "3d", "positions '3d', which this vtc does not have"),
    (("text", "eos_token_ids"), [None], "text.eos_token_ids[0] should be an integer, got NoneType"),  # the audit's
    (("text", "eos_token_ids"), [200], "text.eos_token_ids[0] is 200; it must be in [0, 199]"),
    (("text", "eos_token_ids"), [2] * 65, "text.eos_token_ids has 65 entries"),
    (("model", "image_token_id"), -1, "model.image_token_id"),
    (("model", "image_token"), "", "model.image_token is empty"),
    (("text", "max_seq_len"), 10 ** 9, "text.max_seq_len"),
    (("text", "max_seq_len"), 64, "cannot hold 16 visual + 48 text tokens"),
    (("text", "budget"), 0, "text.budget"),
    (("compression", "k_visual"), 65, "compression.k_visual"),
    (("compression", "n_visual"), 63, "does not give compression.n_visual 63"),
    (("compression", "grid"), [8, 0], "compression.grid[1]"),
    (("compression", "kv_visual_per_layer"), [16], "kv_visual_per_layer has 1 entries; it must have 2"),
    (("compression", "kv_visual_per_layer"), [16, 64], "kv_visual_per_layer is [16, 64]"),
    (("compression", "ratio"), float("nan"), "compression.ratio is nan"),
    (("compression", "ratio"), 0.0, "compression.ratio"),
    (("compression", "stage"), "llm", "compression.work_layer"),
    (("compression", "work_layer"), 1, "must be null for stage 'vision'"),
    (("kv_cache", "dtype"), "float64", "kv_cache.dtype"),
    (("kv_cache", "layer_dtypes"), ["float32", "int8"], "kv_cache.layer_dtypes[1]"),
    (("kv_cache", "bytes_per_token"), 1, "kv_cache.bytes_per_token is 1; it must be in [512, 512]"),
    (("kv_cache", "bytes_total"), 2 ** 62, "kv_cache.bytes_total"),
    (("kv_cache", "scales"), "kv_scales.json", "a float32 cache has no scales"),
    (("kv_cache", "fallback_layers"), [0], "kv_cache.fallback_layers"),
    (("graphs", "vision", "file"), "../other/vision.onnx", "outside the artifact"),
    (("graphs", "vision", "file"), "/abs/vision.onnx", "outside the artifact"),
    (("graphs", "llm", "file"), "vision.onnx", "name the same file"),
    (("graphs", "vision", "inputs", 0, "shape", 2), 2 ** 40, "graphs.vision.inputs[0].shape[2]"),
    (("graphs", "vision", "inputs", 0, "shape", 2), True, "graphs.vision.inputs[0].shape[2] should be an integer"),
    (("graphs", "vision", "outputs", 0, "shape", 1), 17, "image_embeds is float32[1, 17, 64]"),
    (("graphs", "vision", "outputs", 1, "dtype"), "float32", "kept_index is float32"),
    (("graphs", "llm", "inputs", 0, "shape", 1), "seq + $(rm -rf)", "symbolic dimension"),
    (("graphs", "llm", "inputs", 0, "name"), "hidden", "the runtime feeds"),
    (("graphs", "llm", "outputs", 0, "name"), "present_key.1", "appears twice"),
    (("graphs", "llm", "outputs", 0, "dtype"), "complex64", "graphs.llm.outputs[0].dtype"),
    (("graphs", "llm", "profiles", "decode", "past_seq"), 10 ** 7, "graphs.llm.profiles.decode.past_seq"),
    (("graphs", "llm", "profiles", "prefill", "seq"), [17, 99], "graphs.llm.profiles.prefill"),
    (("graphs", "extra"), {"file": "x.onnx", "inputs": [], "outputs": []}, "manifest field graphs has"),
    (("embeddings", "shape"), [200, 65], "embeddings.shape"),
    (("embeddings", "dtype"), "object", "embeddings.dtype"),
    (("embeddings", "file"), "../embed_tokens.npy", "outside the artifact"),
    (("embeddings", "dtype"), "float16", "embeddings.dtype is float16, but graph llm's inputs_embeds is float32"),
    (("dtype",), "float16", "manifest field dtype is float16, but the graphs compute in float32"),
    (("dtype",), "int8", "manifest field dtype"),
    (("preprocess", "image_std"), [0.0, 1.0, 1.0], "preprocess.image_std[0]"),
    (("preprocess", "image_mean"), [float("inf"), 0.5, 0.5], "image_mean"),
    (("preprocess", "size"), {"shortest_edge": 10 ** 6}, "sides must be in [1, 8192]"),
    (("preprocess", "size"), {"height": "a", "width": 3}, "manifest field preprocess"),
    (("preprocess", "crop_size"), {"height": 64, "width": 64}, "the vision graph takes [112, 112]"),
    (("preprocess", "resample"), [3], "resample=[3] is not a PIL filter"),
    (("preprocess", "do_resize"), "yes", "normalised form"),
    (("preprocess", "rescale_factor"), 255, "preprocess.rescale_factor"),
    (("preprocess", "image_processor_type"), 5, "image_processor_type=5"),
    (("preprocess", "extra"), 1, "normalised form"),
    (("files", "vision.onnx", "sha256"), "XYZ", "sha256 is not 64 lowercase hex digits"),
    (("files", "vision.onnx", "bytes"), -1, "files['vision.onnx'].bytes"),
    (("files", "../etc/passwd"), {"sha256": "0" * 64, "bytes": 1}, "outside the artifact"),
    (("files", "manifest.json"), {"sha256": "0" * 64, "bytes": 1}, "names the manifest itself"),
    (("files", "vision.onnx"), {"sha256": "0" * 64}, "files['vision.onnx'] has keys ['sha256']"),
    (("engines",), {"tensorrt_version": "10.3", "device": "x", "compute_capability": "8.7", "precision": "fp16",
                    "graphs": {"llm": {"file": "../llm.plan", "profiles": [], "quantized": []}}, "options": {}},
     "engines.graphs.llm.file"),
    (("engines",), {"tensorrt_version": "10.3", "device": "x", "compute_capability": "abc", "precision": "fp16",
                    "graphs": {}, "options": {}}, "engines.compute_capability"),
])
def test_out_of_bounds_or_inconsistent(path, value, contains):
    d = raw()
    _set(d, path, value)
    fails(d, contains)


def test_the_valid_sample_passes_and_an_in_llm_sample_too():
    """The sample above is valid; so is its in-LLM (FastV-like) variant with every field the stage needs."""
    parse_raw(raw())
    d = raw()
    t = lambda name, dtype, shape: {"name": name, "dtype": dtype, "shape": shape}  # noqa: E731
    kv = lambda i, kind, dim: [t(f"{kind}_key.{i}", "float32", [1, 2, dim, 16]), t(f"{kind}_value.{i}", "float32", [1, 2, dim, 16])]  # noqa: E731
    d["compression"].update(stage="llm", work_layer=1, selector="fastv", kv_visual_per_layer=[64, 16])
    d["graphs"]["vision"]["outputs"][0]["shape"] = [1, 64, 64]
    d["graphs"]["vision"]["outputs"][1]["shape"] = [1, 64]
    common = [t("position_ids", "int64", [1, "seq"]), t("past_lengths", "int64", [1])]
    prof = lambda v: {"prefill": {"seq": [v + 1, v + 48], "past_seq": 0}, "decode": {"seq": 1, "past_seq": 256}}  # noqa: E731
    d["graphs"]["llm_pre"] = {"file": "llm_pre.onnx", "inputs": [t("inputs_embeds", "float32", [1, "seq", 64]), *common,
                                                                   *kv(0, "past", "past_seq")],
                              "outputs": [t("hidden_states", "float32", [1, "seq", 64]), t("last_attn", "float32", [1, "seq"]),
                                          *kv(0, "present", "seq")], "profiles": prof(64)}
    d["graphs"]["llm_post"] = {"file": "llm_post.onnx", "inputs": [t("hidden_states", "float32", [1, "seq", 64]), *common,
                                                                     t("logits_index", "int64", [1]), *kv(1, "past", "past_seq")],
                               "outputs": [t("logits", "float32", [1, 200]), *kv(1, "present", "seq")], "profiles": prof(16)}
    d["graphs"]["select"] = {"file": "select.onnx", "inputs": [t("hidden_states", "float32", [1, "seq", 64])],
                             "outputs": [t("keep_index", "int64", [1, "seq - 48"])], "profiles": {"prefill": {"seq": "prompt length"}}}
    del d["graphs"]["llm"]
    m = parse_raw(d)
    assert m.compression.selector == "fastv"
    for change, contains in [(lambda x: x["graphs"].pop("select"), "manifest field graphs has"),
                             (lambda x: x["compression"].update(selector=None), "compression.selector is null"),
                             (lambda x: x["compression"].update(work_layer=2), "compression.work_layer is 2"),
                             (lambda x: x["compression"].update(kv_visual_per_layer=[16, 16]), "kv_visual_per_layer"),
                             (lambda x: x["graphs"]["llm_pre"]["profiles"]["prefill"].update(seq=[17, 64]), "llm_pre.profiles.prefill")]:
        bad = copy.deepcopy(d)
        change(bad)
        fails(bad, contains)


# -- raw bytes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("data, contains", [
    (b'{"schema": "vtc.artifact", "x": "\xff"}', "is not UTF-8 text"),
    (b"[" * 100000 + b"]" * 100000, "is not valid JSON (RecursionError"),
    (b'{"schema": "vtc.artifact", "n": ' + b"9" * 5000 + b"}", "is not valid JSON (ValueError"),
    (b'{"schema": "vtc.artifact", "x": ' + b"[" * 40 + b"]" * 40 + b"}", "nests deeper than 32 levels"),
    (b'{"schema": "vtc.artifact", "x": "a\\u0000b"}', "NUL character"),
    (b'{"schema": "vtc.artifact", "x": "\\ud800"}', "not valid Unicode"),
])
def test_bad_bytes_are_one_clean_error(data, contains):
    with pytest.raises(ArtifactError) as exc:
        mf.parse(data, "manifest.json")
    assert contains in str(exc.value) and "\n" not in str(exc.value)


# -- ImagePreprocessor.from_config: any bad value is one VtcError ----------------------------------
@pytest.mark.parametrize("cfg", [
    [], None, "CLIPImageProcessor", {"image_processor_type": 5}, {"image_processor_type": ["x"]},
    {"image_processor_type": "CLIPImageProcessor", "size": {"height": "a", "width": 3}},
    {"image_processor_type": "CLIPImageProcessor", "size": [[1], 2]},
    {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": -5}},
    {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": float("nan")}},
    {"image_processor_type": "CLIPImageProcessor", "image_mean": "abc"},
    {"image_processor_type": "CLIPImageProcessor", "image_mean": {"a": 1, "b": 2, "c": 3}},
    {"image_processor_type": "CLIPImageProcessor", "image_std": [1, 2]},
    {"image_processor_type": "CLIPImageProcessor", "image_std": [1, "x", 2]},
    {"image_processor_type": "CLIPImageProcessor", "rescale_factor": "x"},
    {"image_processor_type": "CLIPImageProcessor", "rescale_factor": [1]},
    {"image_processor_type": "CLIPImageProcessor", "rescale_factor": 10 ** 400},
    {"image_processor_type": "CLIPImageProcessor", "resample": [3]},
    {"image_processor_type": "CLIPImageProcessor", "resample": 3.5},
    {"image_processor_type": "CLIPImageProcessor", "crop_size": {"shortest_edge": 3}},
    {"image_processor_type": "CLIPImageProcessor", "data_format": ["x"]},
])
def test_preprocess_from_config_never_raises_a_builtin(cfg):
    from vtc.runtime.errors import ModelError

    with pytest.raises(ModelError):  # a checkpoint's config
        ImagePreprocessor.from_config(cfg)
    with pytest.raises(ArtifactError) as exc:  # a manifest's
        ImagePreprocessor.from_config(cfg, error=ArtifactError)
    assert "\n" not in str(exc.value)
