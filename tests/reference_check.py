"""One shared check: an artifact's runtime output vs the project's PyTorch path for its method."""

from __future__ import annotations

from types import SimpleNamespace

import torch

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
