"""LLaVA-1.5 family: HF `LlavaForConditionalGeneration` (CLIP vision tower + MLP projector + Llama-family LM).

Visual tokens: the vision tower's hidden states at `vision_feature_layer` (-2 for LLaVA-1.5), minus
the [CLS] token when `vision_feature_select_strategy == "default"`, through the projector:
336/14 CLIP-L gives 24x24 = 576 tokens (577 with "full").
"""

from __future__ import annotations

from pathlib import Path

import torch

from vtc.export.llm import StaticCacheLM
from vtc.export.models.base import Adapter, VisionStem, VisualFeatures, VisualSpec, load_hf
from vtc.export.models.clip import ClipBlock
from vtc.runtime.errors import ModelError


def _positive_layers(layer, num_layers: int) -> list[int]:
    """vision_feature_layer (int or list, possibly negative) as indices into hidden_states (0..L)."""
    layers = [layer] if isinstance(layer, int) else list(layer)
    return [x if x >= 0 else num_layers + 1 + x for x in layers]


class LlavaAdapter(Adapter):
    model_type = "llava"
    display_name = "LLaVA-1.5 (LlavaForConditionalGeneration: CLIP/SigLIP + MLP projector + Llama-family LM)"
    image_token = "<image>"
    tokenizer_as_is = True  # AutoTokenizer uses tokenizer.json whatever tokenizer_class says (llava, llava_next, vipllava)

    def load(self, checkpoint_dir: Path, dtype: torch.dtype = torch.float32):
        from transformers import LlavaForConditionalGeneration

        model = load_hf(LlavaForConditionalGeneration, Path(checkpoint_dir), dtype)
        if model.config.text_config.model_type not in ("llama", "mistral", "qwen2"):
            raise ModelError(f"LLaVA with a {model.config.text_config.model_type!r} language model is not supported.",
                             "Supported language models: llama, mistral, qwen2.")
        return model

    # -- shapes ---------------------------------------------------------------------------------
    def visual_spec(self, model) -> VisualSpec:
        vcfg = model.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        has_cls_token = vcfg.model_type == "clip_vision_model"
        full = model.config.vision_feature_select_strategy == "full"
        return VisualSpec(num_tokens=side * side + (1 if full and has_cls_token else 0), grid=(side, side),
                          has_cls=full and has_cls_token, cls_attention=has_cls_token,
                          embed_dim=model.config.text_config.hidden_size,
                          feature_layers=tuple(_positive_layers(model.config.vision_feature_layer, vcfg.num_hidden_layers)))

    def image_size(self, model) -> int:
        return int(model.config.vision_config.image_size)

    # -- modules --------------------------------------------------------------------------------
    def static_cache_lm(self, model, layers: tuple[int, int] | None = None, kv=None) -> StaticCacheLM:
        return StaticCacheLM(model.model.language_model, model.lm_head, layers, kv).eval()

    def embed_table(self, model) -> torch.Tensor:
        """[V, D]: the runtime gathers text embeddings from this table (no scaling for Llama-family)."""
        return model.model.language_model.embed_tokens.weight.detach()

    def visual_features(self, model, pixel_values: torch.Tensor) -> VisualFeatures:
        """HF's `get_image_features` math, on the encoder stopped after the deepest layer it reads.

        The tower's own modules are called one by one (not through HF's output-capture hooks, which
        transformers 5.x installs once, lazily, and which must not see a truncated encoder). Attention
        maps, keys etc. of the feature block are computed only if a method asks (VisualFeatures).
        """
        cfg = model.config
        vm = _vision_model(model)
        layers = vm.encoder.layers
        feat_layers = _positive_layers(cfg.vision_feature_layer, len(layers))
        h = vm.embeddings(pixel_values)  # [1, 1+N, Dv]
        h = vm.pre_layrnorm(h) if hasattr(vm, "pre_layrnorm") else h
        states, block_input = [h], None
        for i in range(max(feat_layers)):  # hidden_states[l] is the output of layers[l-1]
            if i == feat_layers[0] - 1:
                block_input = h
            out = layers[i](h, None)
            h = out[0] if isinstance(out, tuple) else out
            states.append(h)
        selected = [states[x] for x in feat_layers]
        if cfg.vision_feature_select_strategy == "default":
            selected = [x[:, 1:] for x in selected]
        project = model.model.multi_modal_projector
        embeds = project(torch.cat(selected, dim=-1))  # [1, N, D]
        return VisualFeatures(embeds=embeds, states=states[feat_layers[0]], block_input=block_input,
                              block=ClipBlock(layers[feat_layers[0] - 1]), project=project)

    def vision_stem(self, model) -> VisionStem:
        vm = _vision_model(model)
        pre = getattr(vm, "pre_layrnorm", None)

        def embed(pixel_values):
            h = vm.embeddings(pixel_values)  # [1, 1+N, Dv]
            return pre(h) if pre is not None else h

        return VisionStem(embed=embed, blocks=tuple(ClipBlock(layer) for layer in vm.encoder.layers),
                          project=model.model.multi_modal_projector)

    # -- the reference ----------------------------------------------------------------------------
    def reference_features(self, model, pixel_values: torch.Tensor) -> VisualFeatures:
        """`embeds` from HF `get_image_features` on the full tower, [CLS] attention from HF
        `output_attentions=True`; the rest (states, block) from the export path for methods that read them."""
        cfg = model.config
        with torch.no_grad():
            feats = self.visual_features(model, pixel_values)
            hf = model.model.get_image_features(pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                                vision_feature_select_strategy=cfg.vision_feature_select_strategy)
            feats.embeds = torch.cat(list(hf.pooler_output), 0)[None]
            if self.visual_spec(model).cls_attention:
                layer = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, int) else cfg.vision_feature_layer[0]
                out = model.model.vision_tower(pixel_values, output_attentions=True, return_dict=True)
                # hidden_states[l] is produced by layer l-1, i.e. attentions[l-1]; for negative l that is attentions[l].
                att = out.attentions[layer if layer < 0 else layer - 1]
                feats._cls_attn = att[:, :, 0, 1:].float().mean(dim=1)
        return feats

    def reference_generate_inputs(self, model, before: list[int], after: list[int], pixel_values) -> dict:
        """input_ids with the image token repeated N times, as LlavaProcessor expands it, and the pixels."""
        n = self.visual_spec(model).num_tokens
        ids = torch.tensor([before + [self.image_token_id(model)] * n + after])
        return {"input_ids": ids, "pixel_values": pixel_values, "attention_mask": torch.ones_like(ids)}


def _vision_model(model):
    return getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)  # 5.x flattened CLIP


ADAPTER = LlavaAdapter()
