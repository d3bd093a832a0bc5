"""A new compression method is one class: registered here, it builds, runs, passes parity and verify,
and is listed, with no other file touched (the method contract of vtc.export.methods.base)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from vtc.export import methods
from vtc.export.build import BuildArgs, build
from vtc.export.methods.base import Method, Plan, gather_sorted
from vtc.runtime import VLM
from vtc.runtime.errors import MethodError


class EveryOther(Method):
    """Keep visual tokens 0, 2, 4, ... (a toy method: the whole of its definition)."""

    name = "every-other"
    where = "after projector"
    summary = "Keep every other visual token."

    def feasible_k(self, spec, ratio, options) -> int:
        return (spec.num_tokens + 1) // 2

    def compress(self, feats, spec, plan: Plan):
        return gather_sorted(feats.embeds, torch.arange(0, spec.num_tokens, 2))


class NeedsSomethingElse(EveryOther):
    name = "needs-depth"
    requires = frozenset({"cls_token", "depth_map"})


@pytest.fixture
def toy_methods():
    for m in (EveryOther(), NeedsSomethingElse()):
        methods.register(m)
    yield
    for name in ("every-other", "needs-depth"):
        methods.unregister(name)


def _step(_label):
    return contextlib.nullcontext()


def test_toy_method_builds_runs_and_verifies(toy_methods, tiny_checkpoints, tmp_path):
    from vtc.export.verify import verify

    ckpt = tiny_checkpoints["mha-default"]
    built = build(BuildArgs(model=str(ckpt), method="every-other", ratio=0.5, output=str(tmp_path / "art"),
                            max_seq_len=256, text_budget=48), _step)
    m = built.manifest
    assert m.compression.method == "every-other" and m.compression.k_visual == 32 and m.compression.n_visual == 64
    assert m.parity["ok"] and m.parity["greedy_tokens"]["equal"] and m.parity["selection"]["ok"]

    vlm = VLM(built.path)
    res = vlm.generate(_image(), "What is in the picture?", max_new_tokens=4)
    assert res.kept_indices == list(range(0, 64, 2))
    assert res.token_map == [i // 2 if i % 2 == 0 else -1 for i in range(64)]

    report = verify(built.path, tokens=12)  # the PyTorch reference for the method: its own eager compress
    assert report["ok"] and report["greedy_tokens"]["equal"] and report["selection"]["kept_index_equal"]


def test_toy_method_is_listed(toy_methods):
    assert "every-other" in methods.names() and "every-other" in methods.compressing_names()
    assert methods.get("every-other").summary == "Keep every other visual token."


def test_missing_capability_is_refused_with_what_applies(toy_methods, tiny_checkpoints):
    from vtc.export import models

    ckpt = tiny_checkpoints["mha-default"]
    adapter = models.resolve(ckpt)
    spec = adapter.visual_spec(adapter.load(ckpt))
    with pytest.raises(MethodError) as e:
        methods.get("needs-depth").plan(spec, 0.25, {})
    msg = str(e.value)
    assert "depth_map" in msg and "needs-depth" in msg
    assert "Methods that apply to it:" in msg and "every-other" in msg and "pool" in msg


def _image():
    from PIL import Image

    return Image.new("RGB", (64, 48), (200, 40, 40))
