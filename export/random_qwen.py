"""Random-weight Qwen2.5-VL / Qwen2-VL checkpoints of the real HF classes, written as checkpoint directories.

Used by the tests (tiny sizes). The directory has what a published Qwen/Qwen2.5-VL-*-Instruct checkpoint has:
config.json, model.safetensors, generation_config.json, a byte-level BPE tokenizer (trained here on a small fixed
corpus) with Qwen's special tokens (`<|im_start|>`, `<|vision_start|>`, `<|image_pad|>`, ...), the published chat
template, and the image processor's preprocessor_config.json (Qwen2VLImageProcessor, min/max pixels).

HF's default init gives tiny models whose greedy tokens repeat one token whatever the image; every matrix is
re-drawn from normal(0, `init_std`) so that tokens depend on the image and the step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>")
CORPUS = """system You are a helpful assistant. user Describe the image. assistant A red circle on the left.
What color is the shape? How many objects are there? Is there a green triangle below the star?
The picture shows a small dog next to a large tree, and the sky is light blue over the water.
Answer the question about this photo: where is the yellow car, and what is the person doing?
"""
# The chat template Qwen/Qwen2.5-VL-*-Instruct ship (chat_template.json), images as <|vision_start|><|image_pad|>...
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] =="
    " 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


@dataclass(frozen=True)
class RandomQwenSpec:
    """Sizes of a random Qwen2.5-VL (or Qwen2-VL with arch="qwen2_vl"). Defaults are tiny (tests)."""

    arch: str = "qwen2_5_vl"  # qwen2_5_vl | qwen2_vl
    patch_size: int = 14
    merge_size: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    window_size: int = 112  # pixels (Qwen2.5-VL): window side = window_size / patch / merge merged tokens
    fullatt_block_indexes: tuple = (1,)
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    mrope_section: tuple = (2, 3, 3)  # sums to head_dim / 2
    bpe_vocab: int = 400
    vocab: int = 0  # 0 = the tokenizer's size; larger values pad the vocabulary (as the published checkpoints do)
    init_std: float = 0.2
    tie_embeddings: bool = False
    max_pixels: int = 28 * 28 * 1280  # the processor's size["longest_edge"] (published default)
    min_pixels: int = 56 * 56
    extra: dict = field(default_factory=dict)

    @classmethod
    def bench(cls) -> "RandomQwenSpec":
        """`make bench`'s Qwen2.5-VL-like model (tools/bench_qwen.py), scaled like RandomLlavaSpec.bench(): LLM
        1024 x 8 layers, 16 heads / 2 KV heads (Qwen2.5-VL-3B's 8:1 GQA), head dim 64 with mrope_section (8, 12, 12)
        (the published (16, 24, 24) halved with the head dim), vocab 32000, untied head; ViT 640 x 8 blocks (8 heads
        of 80 like the published 1280 / 16, SwiGLU MLP 1712 = the published 2.67x), windows of 112 px, full attention
        at the end of each quarter (1, 3, 5, 7; the published 32 blocks: 7, 15, 23, 31). At 448 x 448: 1024
        patches -> 256 visual tokens."""
        return cls(vision_hidden=640, vision_layers=8, vision_heads=8, vision_intermediate=1712, window_size=112,
                   fullatt_block_indexes=(1, 3, 5, 7), hidden=1024, layers=8, heads=16, kv_heads=2, intermediate=2816,
                   mrope_section=(8, 12, 12), bpe_vocab=1000, vocab=32000, init_std=0.02, tie_embeddings=False)


def _save_tokenizer(out: Path, size: int) -> dict[str, int]:
    from vtc.export.wordtok import train_byte_level_bpe

    tok = train_byte_level_bpe(CORPUS, SPECIALS, size)
    tok.save(str(out / "tokenizer.json"))
    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in sorted(tok.get_added_tokens_decoder().items())}
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
           "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
           "clean_up_tokenization_spaces": False, "model_max_length": 32768, "errors": "replace"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return {t: tok.token_to_id(t) for t in SPECIALS} | {"__size__": tok.get_vocab_size(with_added_tokens=True)}


def _config(spec: RandomQwenSpec, vocab: int, ids: dict):
    import transformers

    vision = dict(depth=spec.vision_layers, hidden_size=spec.vision_hidden, num_heads=spec.vision_heads,
                  patch_size=spec.patch_size, spatial_merge_size=spec.merge_size, temporal_patch_size=2)
    if spec.arch == "qwen2_5_vl":
        vision.update(intermediate_size=spec.vision_intermediate, out_hidden_size=spec.hidden,
                      window_size=spec.window_size, fullatt_block_indexes=list(spec.fullatt_block_indexes))
    else:  # Qwen2-VL: embed_dim / mlp_ratio, full attention everywhere
        vision.update(embed_dim=spec.vision_hidden, hidden_size=spec.hidden, mlp_ratio=2)
    text = dict(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab or vocab,
                max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=spec.tie_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": list(spec.mrope_section)})
    cls = transformers.Qwen2_5_VLConfig if spec.arch == "qwen2_5_vl" else transformers.Qwen2VLConfig
    return cls(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
               video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
               vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=spec.tie_embeddings, **spec.extra)


def write_random_qwen(out: Path, spec: RandomQwenSpec = RandomQwenSpec(), seed: int = 0) -> Path:
    """Write a random-weight Qwen2.5-VL (or Qwen2-VL) checkpoint to `out` (created); returns `out`."""
    import torch
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = _save_tokenizer(out, spec.bpe_vocab)
    torch.manual_seed(seed)
    name = "Qwen2_5_VLForConditionalGeneration" if spec.arch == "qwen2_5_vl" else "Qwen2VLForConditionalGeneration"
    model = getattr(transformers, name)(_config(spec, ids["__size__"], ids)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, spec.init_std)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)
    transformers.Qwen2VLImageProcessorPil(
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}, patch_size=spec.patch_size,
        merge_size=spec.merge_size, temporal_patch_size=2).save_pretrained(out)
    return out
