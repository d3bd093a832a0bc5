"""Manifest schema 3 still reads version-2 artifacts (vtc 0.1): the fields version 3 added are derived."""

from __future__ import annotations

import json
import shutil

import pytest

from vtc.runtime import VLM, load_manifest
from vtc.runtime import manifest as mf
from vtc.runtime.errors import ArtifactError


def _as_v2(text: str) -> str:
    """A version-3 manifest as vtc 0.1 wrote it: version 2, without selector / rope / tokenizer_as_is."""
    raw = json.loads(text)
    raw["schema_version"] = 2
    del raw["compression"]["selector"], raw["lm"]["rope"], raw["text"]["tokenizer_as_is"]
    return json.dumps(raw)


def test_v2_in_llm_artifact_still_runs(artifact_factory, tmp_path):
    # the FastV artifact of the parity matrix (same cache key: built once per session)
    art = tmp_path / "v2"
    shutil.copytree(artifact_factory("mqa-layer-1", "fastv", 0.25, method_options={}), art)
    new = VLM(art)
    want = new.generate(_image(), "What is in the picture?", max_new_tokens=6).token_ids
    (art / mf.MANIFEST).write_text(_as_v2((art / mf.MANIFEST).read_text()))

    m = load_manifest(art)
    assert m.schema_version == 2 and m.compression.selector == "fastv"
    assert m.text.tokenizer_as_is is True and m.lm.rope == "1d"
    assert VLM(art).generate(_image(), "What is in the picture?", max_new_tokens=6).token_ids == want


def test_unknown_versions_are_refused(artifact_factory):
    text = (artifact_factory("mha-default", "none") / mf.MANIFEST).read_text()
    for version in (1, 4):
        raw = json.loads(text)
        raw["schema_version"] = version
        with pytest.raises(ArtifactError, match="reads versions 2, 3"):
            mf.parse(json.dumps(raw))


def test_unknown_selector_is_one_clear_error(artifact_factory, tmp_path):
    art = tmp_path / "sel"
    shutil.copytree(artifact_factory("mqa-layer-1", "fastv", 0.25, method_options={}), art)
    raw = json.loads((art / mf.MANIFEST).read_text())
    raw["compression"]["selector"] = "sparsevlm"
    (art / mf.MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match="'sparsevlm', which this vtc does not have"):
        VLM(art)


def _image():
    from PIL import Image

    return Image.new("RGB", (80, 60), (30, 160, 60))
