"""`vtc.runtime.manifest.parse` is strict: unknown or missing keys, wrong types and other schema versions fail
with one-line ArtifactErrors that say what to do; `parse(m.to_json()) == m`."""

from __future__ import annotations

import copy
import json

import pytest

from vtc.runtime import manifest as mf
from vtc.runtime.errors import ArtifactError


def sample() -> mf.Manifest:
    """A small but complete manifest (every nested dataclass, optional and default fields)."""
    t = mf.TensorSpec
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
                                   outputs=[t("image_embeds", "float32", [1, 16, 64]), t("kept_index", "int64", [1, 16])],
                                   profiles={"static": {}}),
            "llm": mf.GraphSpec(file="llm.onnx", inputs=[t("inputs_embeds", "float32", [1, "seq", 64])],
                                outputs=[t("logits", "float32", [1, 200])],
                                profiles={"prefill": {"seq": [17, 64], "past_seq": 0}}),
        },
        embeddings={"file": "embed_tokens.npy", "dtype": "float32", "shape": [200, 64]},
        preprocess={"image_processor_type": "CLIPImageProcessor", "image_mean": [0.5, 0.5, 0.5]},
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
