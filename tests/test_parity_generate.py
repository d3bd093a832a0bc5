"""Multi-step parity: the ONNX runtime's greedy tokens against HF transformers, 32 new tokens.

ratio 1.0: against plain HF `generate(input_ids, pixel_values)` on the HF processor's inputs.
ratio 0.25 (pool, cls-attn): against the PyTorch reference that applies the same compression to HF's
own image features and runs HF `generate` on the merged embeddings (vtc.export.reference).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.images import random_image
from tests.helpers.matrix import parity_cases
from tests.helpers.parity import NEW_TOKENS, PROMPT, check_against_reference
from vtc.runtime.pipeline import VLM


def _hf_generate(ckpt, image, n):
    from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(ckpt)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                                         add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generation_config.eos_token_id = None  # generate merges it over gc; run exactly n tokens
    with torch.no_grad():
        seq = model.generate(**inputs, generation_config=gc)
    assert seq.shape[1] == inputs["input_ids"].shape[1] + n
    return seq[0, inputs["input_ids"].shape[1]:].tolist(), inputs


@pytest.mark.parametrize("name", [c.config for c in parity_cases("none")])
def test_uncompressed_equals_hf_generate(name, tiny_checkpoints, artifact_factory):
    art = artifact_factory(name, "none")  # "none" is built without a ratio (its matrix rows say 1.0)
    image = random_image(7)
    expected, inputs = _hf_generate(tiny_checkpoints[name], image, NEW_TOKENS)
    vlm = VLM(art)
    prompt = vlm.prepare_prompt(PROMPT)
    pixels = vlm.prepare_image(image)
    np.testing.assert_allclose(pixels, inputs["pixel_values"].numpy(), atol=1e-5)
    n_vis = vlm.manifest.compression.n_visual
    assert prompt.before + [vlm.manifest.model.image_token_id] * n_vis + prompt.after == inputs["input_ids"][0].tolist()
    got = vlm.generate_from(pixels, prompt, NEW_TOKENS, ignore_eos=True).token_ids
    assert got == expected
    assert len(set(expected)) > 1, "degenerate reference: the test would not discriminate"


@pytest.mark.parametrize("method,name,ratio", [(c.method, c.config, c.ratio) for c in parity_cases("pool", "cls-attn")])
def test_compressed_equals_pytorch_reference(method, name, ratio, tiny_checkpoints, artifact_factory):
    out = check_against_reference(artifact_factory(name, method, ratio), tiny_checkpoints[name], method, ratio,
                                  random_image(11))
    assert len(set(out.ref.tokens)) > 1


def test_ratio_quarter_budgets(artifact_factory):
    """K recorded in the manifest follows the budget rule (nearest feasible K for pool)."""
    m = VLM(artifact_factory("mha-default", "pool", 0.25)).manifest.compression
    assert (m.n_visual, m.k_visual, m.options["window"]) == (64, 16, 2)
    m = VLM(artifact_factory("gqa-full", "cls-attn", 0.25)).manifest.compression
    assert (m.n_visual, m.k_visual) == (65, 16)
