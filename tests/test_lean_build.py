"""The memory-lean build (issue 13): what lets a 7B model be exported and checked on a 24 GB host.

- `float32_compute`: HF's float32 math on fp16 weights without a float32 copy of the model; it must equal
  HF on a float32 model holding the same (fp16-rounded) weights, and leave the stored weights untouched.
- The parity probe: when the whole LLM graph cannot run on the build host, the build checks the first and
  last layers (in-LLM methods: the layers before the work layer, and the last) through the same export
  path, says so in the manifest, and `vtc-export verify` then checks the whole artifact.
The lean path normally starts above 1 GiB of float32 weights; these tests lower the thresholds on tiny models.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers.builds import nullstep
from vtc.export import build as build_mod
from vtc.export.build import BuildArgs, build
from vtc.export.reference import float32_compute, reference_generate
from vtc.runtime import load_manifest


def _reference(adapter, model, tokens=6):
    from vtc.export import methods

    spec = adapter.visual_spec(model)
    none = methods.get(methods.NONE)
    size = adapter.image_size(model)
    pixels = torch.linspace(-1, 1, 3 * size * size).reshape(1, 3, size, size).to(next(model.parameters()).dtype)
    return reference_generate(adapter, model, none, none.plan(spec, 1.0, {}), spec, pixels, [1, 5, 7], [9, 11],
                              tokens)


def test_float32_compute_is_hf_float32_on_the_same_weights(tiny_checkpoints):
    from vtc.export import models

    src = tiny_checkpoints["gqa-full"]
    adapter = models.resolve(src)
    half = adapter.load(src, torch.float16)
    full = copy.deepcopy(half).float()  # float32 model, same fp16-rounded weights
    before = {n: (p.dtype, p.data_ptr()) for n, p in half.named_parameters()}
    with float32_compute(half):
        got = _reference(adapter, half)
    want = _reference(adapter, full)
    assert got.tokens == want.tokens
    for a, b in zip(got.step_logits, want.step_logits):
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    assert {n: (p.dtype, p.data_ptr()) for n, p in half.named_parameters()} == before  # weights untouched
    assert half.dtype == torch.float16
    plain = _reference(adapter, half)  # hooks removed: fp16 compute again, which differs from float32
    assert plain.step_logits[0].dtype == torch.float32
    assert not torch.equal(plain.step_logits[0], want.step_logits[0])


def _lean_build(monkeypatch, src, out, method="none", ratio=None, available=0, **kw):
    """Build with the lean path forced, and `available` bytes of host memory as the probe decision sees it."""
    monkeypatch.setattr(build_mod, "LEAN_ABOVE_BYTES", 0)
    monkeypatch.setattr(build_mod, "_available_bytes", lambda: available)
    labels = []

    def step(label):
        labels.append(label)
        return nullstep(label)

    args = BuildArgs(model=str(src), method=method, ratio=ratio, output=str(out), max_seq_len=256, text_budget=48,
                     dtype="fp16", **kw)
    return build(args, step), labels


@pytest.mark.parametrize("method,ratio,probed", [("none", None, [0, 2]), ("fastv", 0.25, None)])
def test_probe_checks_first_and_last_layers_and_verify_checks_all(method, ratio, probed, monkeypatch, tmp_path,
                                                                   tiny_checkpoints):
    from vtc.export.verify import verify

    src = tiny_checkpoints["mqa-layer-1"]  # 3 LLM layers
    built, labels = _lean_build(monkeypatch, src, tmp_path / "a", method, ratio)
    m = load_manifest(built.path)
    p = m.parity
    assert p["ok"] and "float32 compute" in p["reference"]
    if probed is None:  # fastv works at layer 2 of 3: the probe (layers 0, 1 and 2) is the whole LLM
        probed = [0, 1, 2]
        assert p["scope"] == {"vision": "full", "llm": "full"}
    else:
        assert p["scope"]["llm_layers_checked"] == probed and "verify" in p["scope"]["llm"]
        assert any("parity probe" in label for label in labels)
    assert not list(built.path.glob("probe_*")) and not any(f.startswith("probe_") for f in m.files)
    assert m.lm.num_layers == 3 and sum(n.startswith("past_key.") for g in m.graphs.values()
                                        for n in (t.name for t in g.inputs)) == 3  # the artifact is whole
    monkeypatch.setattr(build_mod, "_available_bytes", lambda: 1 << 40)  # a host with the memory for all of it
    report = verify(built.path, tokens=4)  # the full check, float32 PyTorch, every layer
    assert report["ok"], report


def test_probe_of_an_in_llm_method_keeps_the_layers_before_the_work_layer(monkeypatch, tiny_checkpoints):
    from vtc.export import models
    from vtc.export.build import prepare

    monkeypatch.setattr(build_mod, "_available_bytes", lambda: 0)
    args = BuildArgs(model=str(tiny_checkpoints["mqa-layer-1"]), method="fastv", ratio=0.25,
                     method_options={"layer": "1"}, dtype="fp16")
    bp = prepare(args, nullstep, check_output=False)
    assert build_mod.probe_layers(bp) == [0, 2]  # layer 0 before the work layer 1, then the last
    assert build_mod.probe_layers(bp, available=1 << 40) is None  # it fits: the whole LLM is checked
    bp.adapter.keep_lm_layers(bp.model, [0, 2])
    assert models.resolve(tiny_checkpoints["mqa-layer-1"]).lm_spec(bp.model).num_layers == 2


def test_lean_build_of_an_architecture_that_casts_to_its_own_dtype(monkeypatch, tmp_path):
    """SmolVLM casts image features to `self.dtype` before merging them into the text embeddings: under
    float32_compute the model reports float32, and after it float16 again."""
    from tests.helpers.tiny import TINY_IDEFICS3, write_tiny_idefics3

    name = next(n for n in TINY_IDEFICS3 if n.startswith("smolvlm"))
    src = write_tiny_idefics3(tmp_path, name)
    built, _ = _lean_build(monkeypatch, src, tmp_path / "a", available=1 << 40)
    assert built.manifest.parity["ok"] and built.manifest.parity["scope"]["llm"] == "full"
    from vtc.export import models

    adapter = models.resolve(src)
    model = adapter.load(src, torch.float16)
    with float32_compute(model):
        assert model.dtype == torch.float32
    assert model.dtype == torch.float16


def test_verify_refuses_a_full_check_this_host_cannot_hold(monkeypatch, artifact_factory):
    """Before loading anything: a 7B model would need ~63 GB (float32 PyTorch + ONNX Runtime's float32 sessions)."""
    from vtc.export.verify import verify
    from vtc.runtime.errors import ModelError

    art = artifact_factory("mha-default", "none", None)
    monkeypatch.setattr(build_mod, "_available_bytes", lambda: 1 << 20)
    with pytest.raises(ModelError, match="needs about .* GiB") as e:
        verify(art, tokens=2)
    assert "parity.scope" in e.value.fix
