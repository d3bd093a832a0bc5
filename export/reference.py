"""The PyTorch reference every artifact is checked against: HF's own modeling code end to end.

It does not reuse the export wrappers: visual features come from HF `get_image_features` on the full
(untruncated) tower, [CLS] attention from HF `output_attentions=True`, the compression is the method's
eager PyTorch code, and tokens come from HF `generate` (greedy) on the merged `inputs_embeds`, or,
uncompressed, from `generate(input_ids, pixel_values)` exactly as a transformers user would call it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtc.export.methods.base import Method, Plan
from vtc.export.models.base import VisualFeatures


@dataclass
class Reference:
    tokens: list[int]  # greedy new tokens
    step_logits: list  # [V] float32 tensors: logits that chose each token (step 0 = prefill)
    image_embeds: torch.Tensor  # [1, K, D] after compression
    kept_index: list[int]
    token_map: list[int]


def hf_visual_features(adapter, model, pixel_values: torch.Tensor) -> VisualFeatures:
    """The adapter's features with `embeds` and [CLS] attention replaced by HF public-API values
    (`get_image_features` on the full tower; `output_attentions=True`), so the export path's own
    encoder walk and attention math are checked, not assumed."""
    cfg = model.config
    feats = adapter.visual_features(model, pixel_values)
    hf = model.model.get_image_features(pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                        vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats.embeds = torch.cat(list(hf.pooler_output), 0)[None]
    if adapter.visual_spec(model).cls_attention:
        layer = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, int) else cfg.vision_feature_layer[0]
        out = model.model.vision_tower(pixel_values, output_attentions=True, return_dict=True)
        # hidden_states[l] is produced by layer l-1, i.e. attentions[l-1]; for negative l that is attentions[l].
        att = out.attentions[layer if layer < 0 else layer - 1]
        feats._cls_attn = att[:, :, 0, 1:].float().mean(dim=1)
    return feats


def reference_visual(adapter, model, method, plan: Plan, spec, pixel_values: torch.Tensor):
    """(embeds [1, K, D], kept_index [1, K], token_map [1, N]) in eager PyTorch.

    Methods that only `compress` run on HF's own features; methods that run the encoder themselves
    (vision_forward overridden, e.g. ToMe) run their eager path."""
    with torch.no_grad():
        if type(method).vision_forward is not Method.vision_forward:
            return method.vision_forward(adapter, model, pixel_values, spec, plan)
        return method.compress(hf_visual_features(adapter, model, pixel_values), spec, plan)


def _greedy(model, max_new_tokens: int, **inputs) -> tuple[list[int], list]:
    """HF greedy generate for exactly max_new_tokens (EOS disabled: HF merges the model's own
    generation_config over the one passed in, so its eos_token_id is cleared for the call)."""
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            out = model.generate(**inputs, generation_config=gc)
    finally:
        model.generation_config.eos_token_id = saved
    assert len(out.logits) == max_new_tokens, "HF generate stopped early"
    new = out.sequences[0, -max_new_tokens:].tolist()
    return new, [lg[0].float() for lg in out.logits]


def reference_generate(adapter, model, method, plan: Plan, spec, pixel_values: torch.Tensor,
                       before: list[int], after: list[int], max_new_tokens: int) -> Reference:
    """Greedy generation of the compressed model in PyTorch (no EOS stop: exactly max_new_tokens)."""
    image_embeds, kept, token_map = reference_visual(adapter, model, method, plan, spec, pixel_values)
    if plan.k == spec.num_tokens and plan.method == "none":
        ids = torch.tensor([before + [adapter.image_token_id(model)] * spec.num_tokens + after])
        tokens, logits = _greedy(model, max_new_tokens, input_ids=ids, pixel_values=pixel_values,
                                 attention_mask=torch.ones_like(ids))
    else:
        table = adapter.embed_table(model)
        embeds = torch.cat([table[before][None], image_embeds, table[after][None]], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        tokens, logits = _greedy(model, max_new_tokens, inputs_embeds=embeds, attention_mask=mask)
    return Reference(tokens=tokens, step_logits=logits, image_embeds=image_embeds, kept_index=kept[0].tolist(),
                     token_map=token_map[0].tolist())
