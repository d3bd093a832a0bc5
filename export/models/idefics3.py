"""Idefics3 and SmolVLM: HF `Idefics3ForConditionalGeneration` / `SmolVLMForConditionalGeneration`
(SigLIP-style vision encoder without a [CLS] token, pixel-shuffle connector, Llama-family LM).

Visual tokens: the encoder's last layer (+ post_layernorm) over a T x T image, T = vision_config.image_size
(P x P patches, P = T / patch_size), then the connector: pixel shuffle by `scale_factor` s (each s x s block of
patches becomes one token of s^2 * Dv features, row-major over the (P/s) x (P/s) merged grid) and one linear
projection: SmolVLM-256M, 512 px / 16 px patches / s = 4 -> 8 x 8 = 64 tokens per image.

The static image layout (`build --image-splits`, vtc.runtime.tiling): `0` = the global image only (one block
of n tokens, HF's do_image_splitting=False); `R C` = R*C tiles and the global image, B = R*C + 1 images through
the encoder as one static batch, B blocks of n tokens in the prompt, each after its per-tile text
(`<fake_token_around_image><row_r_col_c>`, `<global-img>`), exactly as processing_smolvlm.py expands `<image>`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from vtc.export.llm import StaticCacheLM
from vtc.export.models.base import Adapter, VisualFeatures, VisualSpec, load_hf
from vtc.runtime.errors import ModelError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")


class Idefics3Adapter(Adapter):
    model_type = "idefics3"
    display_name = "Idefics3 (Idefics3ForConditionalGeneration: SigLIP without [CLS] + pixel-shuffle connector + Llama LM)"
    image_token = "<image>"
    hf_class = "Idefics3ForConditionalGeneration"
    splits: tuple[int, int] = (0, 0)  # the static layout; (0, 0) = the global image only

    def with_image_splits(self, splits):
        """A copy of this adapter at `splits` ([0] or [R, C]); the grid is checked against the processor's
        rules (vtc.runtime.tiling.check_layout) when the checkpoint's tile size is known (`preprocessor`)."""
        if splits is None:
            return self
        from vtc.runtime.errors import UsageError

        splits = tuple(splits)
        if splits == (0,):
            splits = (0, 0)
        if len(splits) != 2 or any(type(v) is not int for v in splits):
            raise UsageError(f"--image-splits {' '.join(map(str, splits))}: give the tile grid as two numbers, rows "
                             "and columns, or 0 for the global image only.", "Pass e.g. --image-splits 2 2.")
        out = copy.copy(self)
        out.splits = splits
        return out

    @property
    def num_images(self) -> int:
        """B: images through the encoder per prompt (R*C tiles + the global image, or 1)."""
        rows, cols = self.splits
        return rows * cols + 1 if (rows, cols) != (0, 0) else 1

    # -- loading and shapes ---------------------------------------------------------------------
    def load(self, checkpoint_dir: Path, dtype: torch.dtype = torch.float32):
        import transformers

        tile = self.preprocessor(checkpoint_dir).tile  # the layout is checked before the weights load
        model = load_hf(getattr(transformers, self.hf_class), Path(checkpoint_dir), dtype)
        cfg = model.config
        if cfg.text_config.model_type not in LLAMA_FAMILY:
            raise ModelError(f"{self.model_type} with a {cfg.text_config.model_type!r} language model is not supported.",
                             f"Supported language models: {', '.join(LLAMA_FAMILY)}.")
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        if cfg.vision_config.image_size % cfg.vision_config.patch_size or side % cfg.scale_factor:
            raise ModelError(f"vision image_size {cfg.vision_config.image_size}, patch_size "
                             f"{cfg.vision_config.patch_size} and scale_factor {cfg.scale_factor} do not tile: the "
                             "pixel shuffle needs a whole number of s x s patch blocks.", "Fix the checkpoint config.")
        if tile != cfg.vision_config.image_size:
            raise ModelError(f"the image processor's tiles are {tile} px (max_image_size) but the vision encoder "
                             f"takes {cfg.vision_config.image_size} px.", "Use the checkpoint's own processor config.")
        self._check_seq_len(Path(checkpoint_dir), (side // cfg.scale_factor) ** 2)
        model.vtc_patch_position_ids = _patch_position_ids(model.model.vision_model)  # [1, P*P], HF's own
        model.vtc_between_ids = self._between_ids(Path(checkpoint_dir), self.image_token_id(model))
        return model

    def _between_ids(self, checkpoint_dir: Path, image_id: int) -> list[list[int]]:
        """The per-tile text between consecutive image blocks, as HF's tokenizer encodes it (each piece lies
        between special tokens, so it encodes the same inside any prompt); [] for one image."""
        from transformers import AutoTokenizer

        if self.num_images == 1:
            return []
        tok = AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True, trust_remote_code=False)
        ids = tok(self.image_prompt(checkpoint_dir), add_special_tokens=False)["input_ids"]
        at = [i for i, t in enumerate(ids) if t == image_id]
        if len(at) != self.num_images:
            raise ModelError(f"the tokenizer does not encode {self.image_token!r} as one token in the image prompt.",
                             "Use the checkpoint's own tokenizer (its image token is a special token).")
        return [ids[a + 1:b] for a, b in zip(at, at[1:])]

    @staticmethod
    def _check_seq_len(checkpoint_dir: Path, n: int) -> None:
        """processor_config.json's image_seq_len (the <image> tokens HF's processor writes per image) must
        be what the connector emits, or HF's own model refuses the prompt."""
        from vtc.runtime.text import _read_json

        declared = _read_json(checkpoint_dir / "processor_config.json").get("image_seq_len")
        if declared is not None and declared != n:
            raise ModelError(f"processor_config.json says image_seq_len={declared}, but the connector emits {n} "
                             "tokens per image.", "Fix image_seq_len in processor_config.json.")

    def visual_spec(self, model) -> VisualSpec:
        """N over all B images; the grid stacks their merged (pixel-shuffled) g x g grids: (B*g, g)."""
        cfg = model.config
        g = cfg.vision_config.image_size // cfg.vision_config.patch_size // cfg.scale_factor
        b = self.num_images
        return VisualSpec(num_tokens=g * g * b, grid=(g * b, g), has_cls=False, cls_attention=False,
                          embed_dim=cfg.text_config.hidden_size, feature_layers=(cfg.vision_config.num_hidden_layers,),
                          images=b)

    def image_size(self, model) -> int:
        return int(model.config.vision_config.image_size)

    def pixel_shape(self, model) -> tuple[int, int, int, int]:
        """[B, 3, T, T]: the tiles and the global image go through the encoder as one static batch (one graph
        call, batched matmuls; B is fixed by the layout, so the shape is static for TensorRT too)."""
        t = self.image_size(model)
        return (self.num_images, 3, t, t)

    # -- what the runtime reads ------------------------------------------------------------------
    def preprocessor(self, checkpoint_dir: Path):
        from vtc.runtime.preprocess import ImagePreprocessor
        from vtc.runtime.tiling import TiledPreprocessor

        pp = ImagePreprocessor.from_dir(checkpoint_dir)
        if not isinstance(pp, TiledPreprocessor):
            raise ModelError(f"{checkpoint_dir}'s image processor is {pp.processor_type}, not Idefics3's or SmolVLM's.",
                             "Use the checkpoint's own preprocessor_config.json.")
        return pp.with_splits(self.splits)

    def special_tokens(self, checkpoint_dir: Path) -> tuple[str, str]:
        """(fake token around images, global-image token), as Idefics3Processor fixes them."""
        return "<fake_token_around_image>", "<global-img>"

    def image_prompt(self, checkpoint_dir: Path) -> str:
        """HF's own expansion (processing_smolvlm.get_image_prompt_string, the same text Idefics3Processor
        writes) with one image token per block: the runtime repeats nothing, it places K/B tokens per block."""
        from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

        fake, glob = self.special_tokens(checkpoint_dir)
        rows, cols = self.splits
        return get_image_prompt_string(rows, cols, 1, fake_token_around_image=fake, image_token=self.image_token,
                                       global_image_token=glob)

    # -- modules --------------------------------------------------------------------------------
    def static_cache_lm(self, model, layers: tuple[int, int] | None = None, kv=None) -> StaticCacheLM:
        return StaticCacheLM(model.model.text_model, model.lm_head, layers, kv).eval()

    def embed_table(self, model) -> torch.Tensor:
        return model.model.text_model.embed_tokens.weight.detach()

    def merge_embeds(self, model, table, before, image_embeds, after) -> torch.Tensor:
        """[1, S, D]: before, then each image's K/B visual tokens followed by the per-tile text up to the next
        image (model.vtc_between_ids), then after."""
        blocks = image_embeds.chunk(self.num_images, dim=1)  # B x [1, K/B, D]
        parts = [table[before][None]]
        for block, text in zip(blocks, [*model.vtc_between_ids, after]):
            parts += [block, table[text][None]]
        return torch.cat(parts, dim=1)

    def visual_features(self, model, pixel_values: torch.Tensor) -> VisualFeatures:
        """pixel_values [B, 3, T, T] -> embeds [B, n, D]: HF's encoder layers, post_layernorm and connector
        called as modules; the patch embedding is HF's conv plus HF's position ids for an unpadded image
        (computed by HF's own embeddings at load: `_patch_position_ids`)."""
        vm = model.model.vision_model
        emb = vm.embeddings
        h = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, P*P, Dv]
        h = h + emb.position_embedding(model.vtc_patch_position_ids)
        for layer in vm.encoder.layers:
            out = layer(h, None)
            h = out[0] if isinstance(out, tuple) else out
        states = vm.post_layernorm(h)  # [B, P*P, Dv]
        return VisualFeatures(embeds=model.model.connector(states), states=states)

    # -- the reference ----------------------------------------------------------------------------
    def reference_features(self, model, pixel_values: torch.Tensor) -> VisualFeatures:
        """embeds [B, n, D] from HF `get_image_features`, fed as the processor feeds it ([1, B, 3, T, T] and an
        all-ones pixel_attention_mask: every image is a full tile)."""
        b, _, t, _ = pixel_values.shape
        with torch.no_grad():
            hf = model.model.get_image_features(pixel_values[None], torch.ones(1, b, t, t, dtype=torch.int64))
        embeds = torch.cat(list(hf.pooler_output), 0)
        return VisualFeatures(embeds=embeds.reshape(b, -1, embeds.shape[-1]))

    def prompt_positions(self, model, before: list[int], kept: list[int], after: list[int]) -> torch.Tensor:
        """1-D positions over the whole merged prompt, the per-tile text between image blocks included."""
        between = sum(len(t) for t in model.vtc_between_ids)
        return self.position_ids(len(before) + len(kept) + between + len(after))

    def reference_generate_inputs(self, model, before: list[int], after: list[int], pixel_values) -> dict:
        """input_ids with each image token repeated n times, as the processor expands it, and the pixels."""
        b, _, t, _ = pixel_values.shape
        run = [self.image_token_id(model)] * (self.visual_spec(model).num_tokens // b)
        ids = list(before)
        for text in [*model.vtc_between_ids, after]:
            ids += run + list(text)
        ids = torch.tensor([ids])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values[None],
                "pixel_attention_mask": torch.ones(1, b, t, t, dtype=torch.int64)}


class SmolVLMAdapter(Idefics3Adapter):
    model_type = "smolvlm"
    display_name = "SmolVLM (SmolVLMForConditionalGeneration: SigLIP without [CLS] + pixel-shuffle connector + Llama LM)"
    hf_class = "SmolVLMForConditionalGeneration"
    tokenizer_as_is = True  # AutoTokenizer uses tokenizer.json as is for smolvlm (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS)

    def special_tokens(self, checkpoint_dir: Path) -> tuple[str, str]:
        """SmolVLMProcessor reads them from the tokenizer (its `fake_image_token`, `global_image_token`)."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True, trust_remote_code=False)
        return (getattr(tok, "fake_image_token", "<fake_token_around_image>"),
                getattr(tok, "global_image_token", "<global-img>"))


def _patch_position_ids(vision_model) -> torch.Tensor:
    """[1, P*P] int64: the position ids HF's embeddings give an unpadded T x T image (its bucketized fractional
    coordinates), read off its position_embedding call instead of re-derived."""
    emb = vision_model.embeddings
    side, patch = emb.num_patches_per_side, emb.patch_size
    seen = []
    hook = emb.position_embedding.register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    try:
        with torch.no_grad():
            weight = emb.patch_embedding.weight
            emb(torch.zeros(1, 3, side * patch, side * patch, dtype=weight.dtype),
                patch_attention_mask=torch.ones(1, side, side, dtype=torch.bool))
    finally:
        hook.remove()
    return seen[0]


ADAPTER = Idefics3Adapter()
