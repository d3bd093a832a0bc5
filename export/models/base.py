"""What every architecture adapter provides, and the loading rules they share.

The contract (`Adapter`): everything that differs between architectures lives in the adapter: loading,
visual/LM specs, the export path's and the reference's visual features, the vision blocks as methods see
them (`VisionBlock`), the LLM over a static cache, positions, and the tokenizer facts the runtime needs.
Methods declare what they need from the vision side (`VisualSpec.capabilities`) and never touch
architecture-specific modules.

Loading rules (all adapters): local directory only, safetensors only (pickled `*.bin` weights are
refused), `trust_remote_code=False`, on CPU in the build's dtype (the reference: float32), eager
attention (the reference math).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vtc.runtime.errors import ModelError
from vtc.runtime.manifest import LMInfo


@dataclass(frozen=True)
class VisualSpec:
    """The visual tokens an architecture hands to its language model, before compression."""

    num_tokens: int  # N: tokens the projector emits per image (576 for LLaVA-1.5 "default")
    grid: tuple[int, int]  # patch grid (rows, cols); the patch tokens are row-major
    has_cls: bool  # token 0 is the vision [CLS] token ("full" feature strategy)
    cls_attention: bool  # the encoder has a [CLS] token whose attention can rank patches
    embed_dim: int  # D: the language model's hidden size
    # hidden-state indices the projector reads (hidden_states[l] is the output of encoder layer l-1,
    # so l layers run); () = unknown. Methods inside the encoder (ToMe) plan their schedule from it.
    feature_layers: tuple[int, ...] = ()
    # images through the encoder per prompt (tiles + the global image of a tiling architecture): the N
    # tokens are `images` equal blocks, each a (rows/images) x cols grid (`grid` stacks them), and each
    # block stands in its own place in the prompt. Methods compress each block to K/images (`per_image`).
    images: int = 1

    @property
    def per_image(self) -> "VisualSpec":
        """The spec of one image's block (itself when there is one image)."""
        if self.images == 1:
            return self
        return dataclasses.replace(self, num_tokens=self.num_tokens // self.images,
                                   grid=(self.grid[0] // self.images, self.grid[1]), images=1)

    @property
    def capabilities(self) -> frozenset[str]:
        """What this vision side offers the methods (a method's `requires` must be a subset; see CAPABILITIES)."""
        caps = {"patch_grid"}
        if self.cls_attention:
            caps.add("cls_token")
        if len(self.feature_layers) == 1:
            caps.add("single_feature_layer")
        if self.images == 1:
            caps.add("one_image_block")
        return frozenset(caps)


# What each capability means, for the error a method that needs it gives on a model without it.
CAPABILITIES = {
    "patch_grid": "visual tokens on a row-major patch grid",
    "cls_token": "a vision [CLS] token whose attention ranks the patches",
    "single_feature_layer": "visual tokens from exactly one encoder layer",
    "one_image_block": "the visual tokens as one contiguous block of the prompt (one image, not tiles)",
}


# The LM's cache-sizing shapes: the same record the manifest stores (runtime.manifest.LMInfo).
LMSpec = LMInfo


class VisionBlock:
    """One vision-encoder block as the methods see it, whatever the architecture calls its parts.

    The adapter wraps its encoder's blocks in a subclass (CLIP/SigLIP: vtc.export.models.clip). Methods
    that read attention (cls-attn, VisionZip) or run the blocks themselves (ToMe) use only this.
    """

    num_heads: int
    head_dim: int
    scale: float  # attention logits scale (1/sqrt(head_dim) for CLIP/SigLIP)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block input x [1, T, Dv] -> (q, k, v), each [1, H, T, Dh], after the block's pre-norm."""
        raise NotImplementedError

    def attn_out(self, o: torch.Tensor) -> torch.Tensor:
        """Attention output o [1, T, H*Dh] -> [1, T, Dv] (the output projection)."""
        raise NotImplementedError

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        """x [1, T, Dv] after the attention residual -> the block's output (x + MLP(norm(x)))."""
        raise NotImplementedError


@dataclass
class VisualFeatures:
    """What the vision side computes for one image; methods read what they need (computed lazily).

    embeds       [1, N, D]      projected visual tokens (what the LM sees uncompressed)
    states       [1, 1+Np, Dv]  feature-layer hidden states, [CLS] at 0 when the encoder has one
    block_input  [1, 1+Np, Dv]  input of the encoder block that produces the feature layer
    block        that block (a VisionBlock)
    project      the projector, [1, M, Dv] -> [1, M, D]
    """

    embeds: torch.Tensor
    states: torch.Tensor | None = None
    block_input: torch.Tensor | None = None
    block: VisionBlock | None = None
    project: object = None
    _cls_attn: torch.Tensor | None = None

    @property
    def cls_attn(self) -> torch.Tensor:
        """[1, Np]: head-averaged softmax attention of [CLS] to the patches in `block`."""
        if self._cls_attn is None:
            probs = self.attention_probs(rows=slice(0, 1))  # [1, H, 1, 1+Np]
            self._cls_attn = probs[:, :, 0, 1:].mean(dim=1)
        return self._cls_attn

    def attention_probs(self, rows: slice = slice(None)) -> torch.Tensor:
        """[1, H, R, 1+Np] softmax(q k^T * scale) of `block` for the query rows `rows` (fp32)."""
        q, k = self.queries_keys()
        return torch.softmax(torch.matmul(q[:, :, rows], k.transpose(-1, -2)) * self.block.scale,
                             dim=-1, dtype=torch.float32)

    def queries_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([1, H, 1+Np, Dh], [1, H, 1+Np, Dh]): `block`'s queries and keys, as its attention computes them."""
        q, k, _ = self.block.qkv(self.block_input)
        return q, k


@dataclass(frozen=True)
class VisionStem:
    """The vision side as separate parts, for methods that run the encoder themselves (ToMe).

    embed    pixel_values [1, 3, H, W] -> tokens [1, T0, Dv] (patch + position embeddings, pre-norm)
    blocks   the encoder blocks up to the feature layer, as VisionBlocks
    project  the projector, [1, M, Dv] -> [1, M, D]
    """

    embed: object
    blocks: tuple
    project: object


class Adapter:
    """Everything that differs between VLM architectures. One subclass per module in vtc.export.models.

    A new architecture implements the methods below and registers its module's `ADAPTER` under its
    `model_type`; nothing else in vtc names an architecture.
    """

    model_type: str = ""
    display_name: str = ""
    image_token: str = "<image>"
    # transformers' AutoTokenizer ignores this architecture's declared tokenizer_class and uses
    # tokenizer.json as is (its MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS); recorded in the manifest
    tokenizer_as_is: bool = False
    rope: str = "1d"  # the LLM's position scheme (vtc.runtime.positions); recorded in the manifest

    # -- the static image layout and the files the runtime reads ------------------------------------
    def with_image_splits(self, splits: tuple[int, ...] | None):
        """This adapter at the build's static image layout (`--image-splits`); None = the architecture's
        default. Architectures that see one fixed-size image refuse a layout."""
        if splits is None:
            return self
        from vtc.runtime.errors import UsageError

        raise UsageError(f"--image-splits does not apply to {self.model_type}: it sees each image once, at a "
                         "fixed size.", "Drop --image-splits (it is for architectures that tile images).")

    def with_image_size(self, size: tuple[int, ...] | None):
        """This adapter at the build's static image size (`--image-size H W`); None = the architecture's default.
        Architectures whose encoder takes one fixed size refuse another."""
        if size is None:
            return self
        from vtc.runtime.errors import UsageError

        raise UsageError(f"--image-size does not apply to {self.model_type}: its vision encoder takes one fixed "
                         "image size.", "Drop --image-size (it is for architectures with a free image size: Qwen2-VL).")

    def preprocessor(self, checkpoint_dir: Path):
        """The runtime's image preprocessing for this checkpoint (written to the manifest)."""
        from vtc.runtime.preprocess import ImagePreprocessor

        return ImagePreprocessor.from_dir(checkpoint_dir)

    def image_prompt(self, checkpoint_dir: Path) -> str | None:
        """The text that stands for one image in a prompt, with one image token per block of visual tokens
        (manifest `text.image_prompt`); None = the image token itself."""
        return None

    def merge_embeds(self, model, table: torch.Tensor, before: list[int], image_embeds: torch.Tensor,
                     after: list[int]) -> torch.Tensor:
        """[1, S, D]: the prompt's embeddings with the visual tokens [1, K, D] where the image goes."""
        return torch.cat([table[before][None], image_embeds, table[after][None]], dim=1)

    def pixel_shape(self, model) -> tuple[int, int, int, int]:
        """The vision graph's pixel_values shape: [images, 3, H, W]."""
        side = self.image_size(model)
        return (1, 3, side, side)

    # -- loading and shapes ----------------------------------------------------------------------
    def load(self, checkpoint_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model with its weights in `dtype` (the build's --dtype; the reference loads float32)."""
        raise NotImplementedError

    def visual_spec(self, model) -> VisualSpec:
        raise NotImplementedError

    def lm_spec(self, model) -> LMSpec:
        """The LM's cache-sizing shapes, from the text config and the decoder `static_cache_lm` wraps."""
        t = model.config.get_text_config()
        attn = self.static_cache_lm(model).decoder.layers[0].self_attn
        return LMSpec(num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
                      num_kv_heads=t.num_key_value_heads, head_dim=int(attn.head_dim), hidden_size=t.hidden_size,
                      vocab_size=t.vocab_size, rope=self.rope)

    def image_token_id(self, model) -> int:
        return int(model.config.image_token_id)

    def image_size(self, model) -> int:
        raise NotImplementedError

    # -- modules the export traces -----------------------------------------------------------------
    def static_cache_lm(self, model, layers: tuple[int, int] | None = None, kv=None):
        """The LLM (or the segment over `layers`) over a runtime-owned cache: vtc.export.llm.StaticCacheLM."""
        raise NotImplementedError

    def keep_lm_layers(self, model, keep: list[int]) -> None:
        """Cut the language model to the decoder layers `keep`, in order, in place (the build's parity probe
        of a model too large to check whole; vtc.export.build.probe_layers). HF's generate and the static-cache
        export then see a `len(keep)`-layer model: the config and each attention's cache index follow."""
        decoder = self.static_cache_lm(model).decoder
        decoder.layers = nn.ModuleList([decoder.layers[i] for i in keep])
        for j, layer in enumerate(decoder.layers):
            layer.self_attn.layer_idx = j
        for cfg in {id(c): c for c in (decoder.config, model.config.get_text_config())}.values():
            if getattr(cfg, "layer_types", None):
                cfg.layer_types = [cfg.layer_types[i] for i in keep]
            cfg.num_hidden_layers = len(keep)

    def embed_table(self, model) -> torch.Tensor:
        """[V, D]: the runtime gathers text embeddings from this table."""
        raise NotImplementedError

    def visual_features(self, model, pixel_values: torch.Tensor) -> VisualFeatures:
        """The export path's visual features (traced into vision.onnx)."""
        raise NotImplementedError

    def vision_stem(self, model) -> VisionStem:
        raise NotImplementedError

    # -- the reference (HF public API) -----------------------------------------------------------
    def reference_features(self, model, pixel_values: torch.Tensor) -> VisualFeatures:
        """`visual_features` with `embeds` (and [CLS] attention, if any) taken from HF's public API, so
        the export path's own encoder walk and attention math are checked, not assumed."""
        raise NotImplementedError

    def reference_generate_inputs(self, model, before: list[int], after: list[int], pixel_values) -> dict:
        """The kwargs of HF `generate` for the uncompressed prompt, exactly as a transformers user calls it."""
        raise NotImplementedError

    def position_ids(self, seq: int) -> torch.Tensor:
        """[1, seq] positions of a prompt of `seq` tokens (1-D RoPE)."""
        return torch.arange(seq)[None]

    def prompt_positions(self, model, before: list[int], kept: list[int], after: list[int]) -> torch.Tensor:
        """Positions of the prompt before + visual tokens + after, `kept` [K] the original index of each visual
        token: [1, S] 0..S-1 for 1-D RoPE (a compressed prompt is renumbered); multimodal schemes ([3, 1, S])
        keep each token's original position (vtc.runtime.positions)."""
        return self.position_ids(len(before) + len(kept) + len(after))


def check_weights(checkpoint_dir: Path, max_header: int = 100 * 2 ** 20) -> None:
    """Refuse pickled weights; require safetensors, each file complete: its 8-byte little-endian header
    length at most `max_header` and within the file, the header a JSON object whose tensors (dtype, shape,
    data_offsets) exactly tile the rest of the file, as the safetensors loader requires. Reads only the
    headers, so a truncated or hostile file is one ModelError before transformers opens it."""
    import json
    import math

    itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
                "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
    files = sorted(checkpoint_dir.glob("*.safetensors"))
    for f in files:
        def bad(what: str) -> ModelError:
            return ModelError(f"{f} is not a complete safetensors file: {what}.",
                              "Re-download or re-save the checkpoint (it may have been cut off while copying).")
        if not f.is_file():
            raise bad("it is not a regular file")
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad(f"it has {size} bytes, fewer than the 8 of its header length")
            n = int.from_bytes(head, "little")
            if n > min(max_header, size - 8):
                raise bad(f"its header claims {n} bytes, but the file has {size - 8} after the length field"
                          if n > size - 8 else f"its header claims {n} bytes, over vtc's limit of {max_header}")
            raw = fh.read(n)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise bad(f"its header is not valid JSON ({type(e).__name__})") from e
        if not isinstance(header, dict):
            raise bad("its header is not a JSON object")
        spans, data = [], size - 8 - n
        for name, t in header.items():
            if name == "__metadata__":
                continue
            offsets = t.get("data_offsets") if isinstance(t, dict) else None
            shape = t.get("shape") if isinstance(t, dict) else None
            ints = lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                                                         for x in v)  # noqa: E731
            if not (ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1] and ints(shape)):
                raise bad(f"tensor {name!r} has no valid shape and data_offsets")
            width = itemsize.get(t.get("dtype"))
            if width is not None and (offsets[1] - offsets[0]) != math.prod(shape) * width:
                raise bad(f"tensor {name!r} ({t.get('dtype')} {shape}) does not fill its {offsets[1] - offsets[0]} bytes")
            spans.append((offsets[0], offsets[1], name))
        end = 0
        for begin, stop, name in sorted(spans):
            if begin != end:
                raise bad(f"tensor {name!r} starts at byte {begin} of the data, not at {end}")
            end = stop
        if end != data:
            raise bad(f"its tensors need {end} bytes of data and the file has {data}")
    if files:
        return
    if any(checkpoint_dir.glob("*.bin")) or any(checkpoint_dir.glob("*.pt")):
        raise ModelError(f"{checkpoint_dir} has only pickled weights (*.bin/*.pt); vtc never loads pickles.",
                         "Convert them to safetensors (e.g. `model.save_pretrained(dir, safe_serialization=True)` "
                         "in a trusted environment) and pass that directory.")
    raise ModelError(f"{checkpoint_dir} has no *.safetensors weights.",
                     "Pass a complete checkpoint directory (config.json + model*.safetensors).")


def load_hf(cls, checkpoint_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load an HF model class from a local directory under the loading rules above, its weights in
    `dtype` (loaded straight in that dtype: no float32 copy of a float16 checkpoint)."""
    check_weights(checkpoint_dir)
    try:
        model = cls.from_pretrained(checkpoint_dir, dtype=dtype, attn_implementation="eager",
                                    use_safetensors=True, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"could not load {checkpoint_dir} as {cls.__name__}: {e}",
                         "Check that the directory is a complete, uncorrupted checkpoint.") from e
    return model.eval()
