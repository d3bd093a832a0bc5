"""Qwen2.5-VL and Qwen2-VL: HF `Qwen2_5_VLForConditionalGeneration` / `Qwen2VLForConditionalGeneration`
(ViT with 2-D rotary embeddings, no [CLS] token; Qwen2.5: windowed attention except at `fullatt_block_indexes`;
the 2x2 patch merger; a Qwen2 LM with multimodal RoPE, `mrope_section`).

A static image size (`build --image-size H W`, multiples of patch x merge = 28; default 448 x 448): the runtime
resizes every image to exactly H x W (HF picks a size per image, `smart_resize`; at an image whose smart_resize is
H x W the two agree bit for bit). The vision graph takes pixel_values [1, 3, H, W] and cuts the patches itself, in
HF's order ([n, 3*2*14*14], each image duplicated along time, `patchify`). For the fixed grid, everything HF
computes from `grid_thw` at run time is a constant computed here once with HF's own helpers and baked into the
graph: the 2-D rotary cos/sin, the window permutation (and its inverse), and the window boundaries, which become a
block-diagonal attention mask (no data-dependent split). Visual tokens: (H/28) x (W/28), row-major over the merged
grid (448 x 448 -> 16 x 16 = 256).

Positions (M-RoPE, vtc.runtime.positions "mrope"): visual token (r, c) of an image starting at s has (t, h, w) =
(s, s + r, s + c); the text after it continues at s + max(rows, cols). A compressed prompt keeps each kept token's
original (t, h, w) and the uncompressed positions of the text after the image; a merged token (pool) takes the
position of its window's top-left token (its kept_index); decode continues at the largest position + 1 (HF's
rope_deltas rule).
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from vtc.export.llm import StaticCacheLM
from vtc.export.models.base import Adapter, VisualFeatures, VisualSpec, load_hf
from vtc.runtime.errors import ModelError, UsageError


@dataclass
class StaticVision:
    """The constants of the vision forward at one grid (computed by HF's helpers at load, baked into the graph)."""

    grid_thw: torch.Tensor  # [1, 3] (1, H/patch, W/patch)
    perm: torch.Tensor  # [n] patch order for windowed attention (HF permute_input_for_window_attn)
    cos: torch.Tensor  # [n, Dh] 2-D rotary embedding, permuted
    sin: torch.Tensor
    window_mask: torch.Tensor | None  # [n, n] bool: same window (None: one window, or `window_len`)
    window_len: int | None  # all windows this long: attention batched over [n / L, L] windows instead of a mask
    full_blocks: frozenset  # blocks with full attention (fullatt_block_indexes)
    reverse: torch.Tensor  # [N] merged tokens back to row-major order


def patchify(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """pixel_values [1, 3, H, W] -> [n, 3 * temporal * patch * patch] in HF's order (image_processing_pil_qwen2_vl
    `patchify`: merge-block-major, the image repeated `temporal` times); reshapes only, so it is exact."""
    _, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(c, gh // merge, merge, patch, gw // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], temporal, patch, patch)
    return x.reshape(gh * gw, c * temporal * patch * patch)


def _static_vision(visual, hw: tuple[int, int]) -> StaticVision:
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    cfg, merge = visual.config, visual.spatial_merge_size
    unit = merge * merge
    grid = torch.tensor([[1, hw[0] // cfg.patch_size, hw[1] // cfg.patch_size]])
    n = int(grid[0, 1] * grid[0, 2])
    if getattr(cfg, "window_size", None):  # Qwen2.5-VL
        window_index, cu = get_vision_window_index(grid, merge, cfg.window_size, cfg.patch_size)
        full = frozenset(cfg.fullatt_block_indexes)
    else:  # Qwen2-VL: one window, full attention in every block
        window_index, cu, full = torch.arange(n // unit), torch.tensor([0, n]), frozenset()
    perm = (window_index[:, None] * unit + torch.arange(unit)).reshape(-1)
    with torch.no_grad():
        weight = visual.patch_embed.proj.weight
        cos, sin = visual.rotary_pos_emb(weight, get_vision_position_ids(grid, merge))  # [n, Dh] each
    lengths = (cu[1:] - cu[:-1]).long()
    window = torch.repeat_interleave(torch.arange(len(cu) - 1), lengths)  # [n] window id
    equal = len(cu) > 2 and bool((lengths == lengths[0]).all())
    mask = None if len(cu) == 2 or equal else window[:, None] == window[None, :]
    return StaticVision(grid_thw=grid, perm=perm, cos=cos[perm], sin=sin[perm], window_mask=mask,
                        window_len=int(lengths[0]) if equal else None, full_blocks=full,
                        reverse=torch.argsort(window_index))


def _block(blk, h: torch.Tensor, cos, sin, mask, rope, window_len: int | None = None) -> torch.Tensor:
    """One HF vision block on h [n, Dv] with its own modules; attention as HF's eager path computes it per window
    (fp32 softmax of q k^T * scaling): windows of one length L as a batch [n / L, H, L, Dh], uneven ones as a
    block-diagonal mask (masked scores: finfo.min -> exp 0), one window (full attention) as is."""
    attn, n = blk.attn, h.shape[0]
    q, k, v = attn.qkv(blk.norm1(h)).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [n, H, Dh]
    q, k = rope(q, k, cos, sin)
    w = window_len or n
    q, k, v = (x.reshape(n // w, w, attn.num_heads, -1).transpose(1, 2) for x in (q, k, v))  # [n/L, H, L, Dh]
    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling  # [n/L, H, L, L]
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(n, -1)  # [n, H*Dh]
    h = h + attn.proj(out)
    return h + blk.mlp(blk.norm2(h))


class Qwen2_5_VLAdapter(Adapter):
    model_type = "qwen2_5_vl"
    display_name = ("Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration: windowed ViT with 2-D RoPE, no [CLS] + 2x2 patch "
                    "merger + Qwen2 LM with M-RoPE)")
    hf_class = "Qwen2_5_VLForConditionalGeneration"
    image_token = "<|image_pad|>"
    # Qwen2Tokenizer rebuilds tokenizer.json's own BPE with the pre-tokenizer the published tokenizer.json declares;
    # the runtime reads tokenizer.json (tests/test_qwen2_5_vl.py checks the prompt ids against HF's tokenizer)
    tokenizer_as_is = True
    rope = "mrope"
    image_hw: tuple[int, int] = (448, 448)  # the static image size (vtc.runtime.preprocess.STATIC_IMAGE_SIZE)

    def with_image_size(self, size):
        """A copy of this adapter at the static image size (H, W) (`build --image-size`); None = 448 x 448."""
        if size is None:
            return self
        size = tuple(size)
        if len(size) != 2 or any(type(v) is not int for v in size):
            raise UsageError(f"--image-size {' '.join(map(str, size))}: give the image size as two numbers, height "
                             "and width.", "Pass e.g. --image-size 448 448.")
        if any(v < 28 or v % 28 for v in size):
            near = " ".join(str(max(28, round(v / 28) * 28)) for v in size)
            raise UsageError(f"--image-size {size[0]} {size[1]}: {self.display_name.split(' (')[0]} needs both sides "
                             "to be positive multiples of 28 (14-pixel patches merged 2 x 2).",
                             f"Pass --image-size {near}.")
        out = copy.copy(self)
        out.image_hw = size
        return out

    # -- loading and shapes ---------------------------------------------------------------------
    def load(self, checkpoint_dir: Path, dtype: torch.dtype = torch.float32):
        import transformers

        model = load_hf(getattr(transformers, self.hf_class), Path(checkpoint_dir), dtype)
        vc = model.config.vision_config
        factor = vc.patch_size * vc.spatial_merge_size
        if any(v % factor for v in self.image_hw):
            raise UsageError(f"--image-size {self.image_hw[0]} {self.image_hw[1]} is not a multiple of this "
                             f"checkpoint's patch x merge size ({factor}).", f"Pass sides that are multiples of {factor}.")
        model.vtc_static = _static_vision(model.model.visual, self.image_hw)
        return model

    def visual_spec(self, model) -> VisualSpec:
        merge = model.config.vision_config.spatial_merge_size * model.config.vision_config.patch_size
        rows, cols = self.image_hw[0] // merge, self.image_hw[1] // merge
        return VisualSpec(num_tokens=rows * cols, grid=(rows, cols), has_cls=False, cls_attention=False,
                          embed_dim=model.config.text_config.hidden_size,
                          feature_layers=(model.config.vision_config.depth,))

    def image_size(self, model) -> int:
        return self.image_hw[0]

    def pixel_shape(self, model) -> tuple[int, int, int, int]:
        return (1, 3, *self.image_hw)

    def preprocessor(self, checkpoint_dir: Path):
        """The checkpoint's normalisation at the static size (vtc.runtime.preprocess PATCH_TYPES)."""
        import dataclasses

        from vtc.runtime.preprocess import PATCH_TYPES, ImagePreprocessor

        pp = ImagePreprocessor.from_dir(checkpoint_dir)
        if pp.processor_type not in PATCH_TYPES:
            raise ModelError(f"{checkpoint_dir}'s image processor is {pp.processor_type}, not Qwen2-VL's.",
                             "Use the checkpoint's own preprocessor_config.json.")
        return dataclasses.replace(pp, resize_hw=tuple(self.image_hw))

    # -- modules --------------------------------------------------------------------------------
    def static_cache_lm(self, model, layers: tuple[int, int] | None = None, kv=None) -> StaticCacheLM:
        """HF's Qwen2 decoder; its rotary embedding takes position_ids [3, 1, S] and applies mrope_section itself."""
        return StaticCacheLM(model.model.language_model, model.lm_head, layers, kv, positions=self.rope).eval()

    def embed_table(self, model) -> torch.Tensor:
        return model.model.language_model.embed_tokens.weight.detach()

    def visual_features(self, model, pixel_values: torch.Tensor) -> VisualFeatures:
        """pixel_values [1, 3, H, W] -> embeds [1, N, D]: HF's patch embedding, blocks' modules, merger, with the
        grid's constants (`_static_vision`)."""
        vis, c = model.model.visual, model.vtc_static
        vc = model.config.vision_config
        rope = sys.modules[type(vis.blocks[0].attn).__module__].apply_rotary_pos_emb_vision
        patches = patchify(pixel_values, vc.patch_size, vc.spatial_merge_size, vc.temporal_patch_size)
        h = torch.index_select(vis.patch_embed(patches), 0, c.perm)  # [n, Dv] in window order
        for i, blk in enumerate(vis.blocks):
            full = i in c.full_blocks
            h = _block(blk, h, c.cos, c.sin, None if full else c.window_mask, rope, None if full else c.window_len)
        merged = torch.index_select(vis.merger(h), 0, c.reverse)  # [N, D] row-major over the merged grid
        return VisualFeatures(embeds=merged[None])

    # -- the reference ----------------------------------------------------------------------------
    def hf_pixels(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3*2*14*14]: HF's image processor's own patchify of the preprocessed image [1, 3, H, W]."""
        from transformers import Qwen2VLImageProcessorPil

        vc = model.config.vision_config
        flat, _, _ = Qwen2VLImageProcessorPil().patchify(pixel_values[0].float().numpy(), vc.patch_size,
                                                         vc.spatial_merge_size, vc.temporal_patch_size)
        return torch.from_numpy(flat).to(pixel_values.dtype)

    def reference_features(self, model, pixel_values: torch.Tensor) -> VisualFeatures:
        """embeds [1, N, D] from HF `get_image_features` (its own windows, cu_seqlens and merger)."""
        with torch.no_grad():
            hf = model.model.get_image_features(self.hf_pixels(model, pixel_values), model.vtc_static.grid_thw)
        return VisualFeatures(embeds=hf.pooler_output[0][None])

    def reference_generate_inputs(self, model, before: list[int], after: list[int], pixel_values) -> dict:
        """What processing_qwen2_5_vl.py gives `generate`: <|image_pad|> repeated N times, the patches, the grid and
        mm_token_type_ids (1 at image tokens)."""
        ids = torch.tensor([before + [self.image_token_id(model)] * self.visual_spec(model).num_tokens + after])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": self.hf_pixels(model, pixel_values), "image_grid_thw": model.vtc_static.grid_thw,
                "mm_token_type_ids": (ids == self.image_token_id(model)).int()}

    def prompt_positions(self, model, before: list[int], kept: list[int], after: list[int]) -> torch.Tensor:
        """[3, 1, S]: HF's get_rope_index on the uncompressed prompt, at the columns the compressed prompt keeps."""
        inputs = self.reference_generate_inputs(model, before, after, torch.zeros(1, 3, *self.image_hw))
        full, _ = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"])
        n = self.visual_spec(model).num_tokens
        b = len(before)
        cols = [*range(b), *(b + int(k) for k in kept), *range(b + n, b + n + len(after))]
        return full[:, :, cols]


class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    model_type = "qwen2_vl"
    display_name = ("Qwen2-VL (Qwen2VLForConditionalGeneration: ViT with 2-D RoPE, no [CLS] + 2x2 patch merger + "
                    "Qwen2 LM with M-RoPE)")
    hf_class = "Qwen2VLForConditionalGeneration"


ADAPTER = Qwen2_5_VLAdapter()
