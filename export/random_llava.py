"""Random-weight LLaVA checkpoints of real HF classes, written as normal HF checkpoint directories.

Used by the built-in demo, the tests (tiny configs) and the benchmark (bench-size config). The
directory has what a real llava-hf checkpoint has: config.json, model.safetensors,
generation_config.json, a fast tokenizer (word-level, see vtc.export.wordtok), a chat template,
preprocessor_config.json and a LlavaProcessor config, so transformers' AutoProcessor loads it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vtc.export.wordtok import LLAVA15_CHAT_TEMPLATE, save_word_level_tokenizer

IMAGE_TOKEN_ID = 4  # wordtok's fixed id for <image>


@dataclass(frozen=True)
class RandomLlavaSpec:
    """Sizes of a random LLaVA. Defaults are tiny (tests); `bench()` gives the benchmark size."""

    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 32
    vision_layers: int = 3
    vision_heads: int = 4
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 0  # 0 = the tokenizer's size; larger values pad the vocabulary
    feature_layer: int = -2
    strategy: str = "default"
    initializer_range: float = 0.05
    words: tuple = field(default=())

    @staticmethod
    def bench() -> "RandomLlavaSpec":
        """LLM hidden 1024 x 8 layers x 16 heads, vocab 32000; a 336/14 CLIP-like encoder (576 tokens).

        The encoder (256 wide, 6 layers, CLIP's head dim 64) is sized so that vision : LLM prefill
        compute is about 1 : 19, close to LLaVA-1.5-7B's 1 : 23 (CLIP-L/336 ~0.35 TFLOP vs the 7B LM
        ~8 TFLOP at ~600 tokens). A relatively heavier encoder (384 wide: 1 : 9.5) caps the TTFT gain
        of compression, since the encoder always sees all 576 patches.
        """
        return RandomLlavaSpec(image_size=336, vision_hidden=256, vision_layers=6, vision_heads=4, hidden=1024,
                               layers=8, heads=16, kv_heads=16, intermediate=2816, vocab=32000,
                               initializer_range=0.02)


DEFAULT_WORDS = tuple("""
a an the this that is are was it there what which who where how yes no not and or of in on at to from with
for over under above below left right top bottom middle image picture photo scene object shape color red
green blue yellow orange purple pink brown black white gray dark light small large round square circle
triangle star line grid background person dog cat bird car tree house sky water can you see describe
tell me about count many do does show looks like please answer question
""".split())


def write_random_llava(out: Path, spec: RandomLlavaSpec = RandomLlavaSpec(), seed: int = 0) -> Path:
    """Write a random-weight LLaVA checkpoint to `out` (created); returns `out`."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_tok = save_word_level_tokenizer(out, sorted(set(spec.words or DEFAULT_WORDS)), LLAVA15_CHAT_TEMPLATE)
    vocab = max(spec.vocab, n_tok)
    vision = CLIPVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
                              num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                              image_size=spec.image_size, patch_size=spec.patch_size, projection_dim=spec.vision_hidden)
    text = LlamaConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
                       num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=vocab,
                       max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       initializer_range=spec.initializer_range)
    side = spec.image_size // spec.patch_size
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                      vision_feature_layer=spec.feature_layer, vision_feature_select_strategy=spec.strategy,
                      image_seq_length=side * side)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": spec.image_size},
                                         crop_size={"height": spec.image_size, "width": spec.image_size})
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                               vision_feature_select_strategy=spec.strategy, chat_template=LLAVA15_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    processor.save_pretrained(out)
    return out
