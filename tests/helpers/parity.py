"""Artifact-vs-PyTorch parity: an artifact's runtime output against the project's PyTorch path for its method
(vtc.export.reference): kept indices, token map and greedy tokens (multi-step, KV cache) must be identical."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tests.helpers.graphs import assert_static_friendly, vision_graph_ops
from tests.helpers.images import random_image
from vtc.export import methods, models
from vtc.export.reference import reference_generate
from vtc.runtime.pipeline import VLM

PROMPT = "What shapes do you see in the picture?"
NEW_TOKENS = 32


def check_against_reference(art, ckpt, method: str, ratio: float, image, options: dict | None = None,
                            new_tokens: int = NEW_TOKENS) -> SimpleNamespace:
    """Greedy tokens (multi-step, KV cache), kept indices and merge map must be identical."""
    vlm = VLM(art)
    adapter = models.resolve(ckpt)
    model = adapter.load(ckpt)
    spec = adapter.visual_spec(model)
    m = methods.get(method)
    plan = m.plan(spec, ratio, dict(options or {}))
    assert plan.k == vlm.manifest.compression.k_visual
    prompt, pixels = vlm.prepare_prompt(PROMPT), vlm.prepare_image(image)
    ref = reference_generate(adapter, model, m, plan, spec, torch.from_numpy(pixels), prompt.before, prompt.after,
                             new_tokens)
    res = vlm.generate_from(pixels, prompt, new_tokens, ignore_eos=True)
    assert res.kept_indices == ref.kept_index
    assert res.token_map == ref.token_map
    assert res.token_ids == ref.tokens
    return SimpleNamespace(vlm=vlm, plan=plan, spec=spec, ref=ref, res=res, prompt=prompt)


def check_parity(name, method, ratio, tiny_checkpoints, artifact_factory) -> None:
    """ONNX runtime vs the PyTorch reference (vtc.export.reference): kept indices, token map, 32 greedy
    tokens; on further images while the reference's tokens are all one token (a non-discriminating check)."""
    art = artifact_factory(name, method, ratio)
    vlm = VLM(art)
    adapter = models.resolve(tiny_checkpoints[name])
    model = adapter.load(tiny_checkpoints[name])
    spec = adapter.visual_spec(model)
    m = methods.get(method)
    plan = m.plan(spec, ratio, {})
    assert plan.k == vlm.manifest.compression.k_visual
    for image_seed in (11, 12, 13, 14):
        ref_tokens = _parity_one_image(vlm, adapter, model, m, plan, spec, image_seed)
        if len(set(ref_tokens)) > 1:
            break
    assert len(set(ref_tokens)) > 1, "degenerate reference on every image: the test would not discriminate"
    assert_static_friendly(vision_graph_ops(art))


def _parity_one_image(vlm, adapter, model, m, plan, spec, image_seed: int) -> list[int]:
    prompt, pixels = vlm.prepare_prompt(PROMPT), vlm.prepare_image(random_image(image_seed))
    ref = reference_generate(adapter, model, m, plan, spec, torch.from_numpy(pixels), prompt.before, prompt.after,
                             NEW_TOKENS)
    res = vlm.generate_from(pixels, prompt, NEW_TOKENS, ignore_eos=True)
    assert res.kept_indices == ref.kept_index
    assert len(set(res.kept_indices)) == plan.k and res.kept_indices == sorted(res.kept_indices)
    assert res.token_map == ref.token_map
    assert res.token_ids == ref.tokens
    return ref.tokens
