"""Quantized KV cache (int8, fp8, fp16): storage, calibration, accuracy, bytes, bad input."""

from __future__ import annotations

import dataclasses

import json
import shutil

import numpy as np
import pytest

from tests.helpers.builds import nullstep
from tests.helpers.images import random_image
from tests.helpers.matrix import KV_MATRIX
from tests.helpers.parity import PROMPT
from vtc.export.build import BuildArgs, prepare
from vtc.runtime.errors import InputError, UsageError
from vtc.runtime.pipeline import VLM


@pytest.fixture(scope="module")
def quant_arts(artifact_factory):
    c = KV_MATRIX
    return {kv: artifact_factory(c.config, c.method, c.ratio, kv_cache=kv) for kv in c.kv_caches}


@pytest.mark.parametrize("kv", KV_MATRIX.calibrated)
def test_quantized_accuracy_and_storage(kv, quant_arts):
    m = VLM(quant_arts[kv]).manifest
    acc = m.kv_cache.accuracy
    assert acc["pairs"] >= 20 and acc["new_tokens"] == 32
    assert acc["logits_cosine_median"] >= 0.999, acc
    assert m.kv_cache.scales == "kv_scales.json" and m.kv_cache.scale_source.startswith("calibrated")
    dtypes = {"int8": "int8", "fp8": "float8_e4m3fn"}[kv]
    assert set(m.kv_cache.layer_dtypes) == {dtypes}
    vlm = VLM(quant_arts[kv])
    assert {layer.dtype.name for layer in vlm.cache.layers} == {"int8" if kv == "int8" else "uint8"}


def test_kv_bytes(quant_arts):
    per = {kv: VLM(a).manifest.kv_cache.bytes_per_token for kv, a in quant_arts.items()}
    assert per["int8"] * 2 == per["fp16"] and per["fp8"] == per["int8"] and per["fp16"] * 2 == per["fp32"]


def test_decode_writes_only_the_new_slot(quant_arts):
    vlm = VLM(quant_arts["int8"])
    prompt, pixels = vlm.prepare_prompt(PROMPT), vlm.prepare_image(random_image(3))
    embeds, _, _ = vlm.encode_image(pixels)
    vlm.prefill(prompt, embeds)
    before = [layer.copy() for layer in vlm.cache.layers]
    pos = int(vlm.cache.lengths[0])
    vlm.decode_step(5)
    changed = [np.argwhere((old != new).any(axis=(0, 1, 2, 4)))[:, 0].tolist()
               for old, new in zip(before, vlm.cache.layers)]
    assert all(c in ([pos], []) for c in changed)  # nothing but the new token's position...
    assert sum(c == [pos] for c in changed) >= len(changed) - 1  # ...and it was written (an all-zero K/V aside)
    assert vlm.cache.lengths.tolist() == [pos + 1] * len(changed)


def test_verify_quantized(quant_arts, capsys):
    from vtc.export.cli import main

    assert main(["verify", str(quant_arts["int8"]), "--tokens", "8"]) == 0
    assert "verify: ok" in capsys.readouterr().out


def _args(ckpt, **kw):
    return BuildArgs(model=str(ckpt), method="pool", ratio=0.25, max_seq_len=256, text_budget=48, **kw)


def test_scales_file_checks(tmp_path, quant_arts, tiny_checkpoints):
    from vtc.export import kvquant

    good = quant_arts["int8"] / "kv_scales.json"
    bp = prepare(_args(tiny_checkpoints["gqa-full"], kv_cache="int8", kv_scales=str(good)), nullstep, check_output=False)
    assert kvquant.plan(tmp_path, bp, nullstep).quant.dtypes[0] == "int8"
    other_model = prepare(_args(tiny_checkpoints["mha-default"], kv_cache="int8", kv_scales=str(good)), nullstep,
                          check_output=False)
    with pytest.raises(InputError, match="another model"):
        kvquant.plan(tmp_path, other_model, nullstep)
    bp_cls = dataclasses.replace(bp, plan=bp.plan.__class__(method="cls-attn", ratio=0.25, n=65, k=16, options={}))
    with pytest.raises(InputError, match="method"):
        kvquant.plan(tmp_path, bp_cls, nullstep)
    bad = tmp_path / "bad.json"
    data = json.loads(good.read_text())
    data["layers"][0]["k"] = "nope"
    bad.write_text(json.dumps(data))
    bad_bp = dataclasses.replace(bp, args=_args(tiny_checkpoints["gqa-full"], kv_cache="int8", kv_scales=str(bad)))
    with pytest.raises(InputError, match="malformed|shape"):
        kvquant.plan(tmp_path, bad_bp, nullstep)
    bad.write_text("{not json")
    with pytest.raises(InputError, match="JSON"):
        kvquant.plan(tmp_path, bad_bp, nullstep)


def test_empty_or_bad_calibration_set(tmp_path, tiny_checkpoints):
    from vtc.calibration import dataset

    (tmp_path / "imgs").mkdir()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    with pytest.raises(UsageError, match="no images"):
        dataset.user_pairs(tmp_path / "imgs", prompts)
    shutil.copy(_png(tmp_path), tmp_path / "imgs" / "a.png")
    prompts.write_text("")
    with pytest.raises(UsageError, match="no prompts"):
        dataset.user_pairs(tmp_path / "imgs", prompts)
    prompts.write_text('{"prompt": ""}\n')
    with pytest.raises(InputError, match="p.jsonl:1"):
        dataset.user_pairs(tmp_path / "imgs", prompts)
    with pytest.raises(UsageError, match="go together"):
        prepare(_args(tiny_checkpoints["gqa-full"], kv_cache="int8", calib_images=str(tmp_path)), nullstep)
    with pytest.raises(UsageError, match="int8|fp8"):
        prepare(_args(tiny_checkpoints["gqa-full"], kv_scales=str(prompts)), nullstep)


def _png(tmp_path):
    path = tmp_path / "x.png"
    random_image(1).save(path)
    return path
