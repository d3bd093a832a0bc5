"""The tiny random checkpoints the suite builds from (real HF classes, random weights).

Three LLaVA configs cover multi-head and grouped-query attention (including multi-query), both
`vision_feature_select_strategy` values and two feature layers; conftest.py writes each once per session.
"""

from __future__ import annotations

from vtc.export.random_llava import RandomLlavaSpec

TINY = {
    # name: (spec, seed)
    "mha-default": (RandomLlavaSpec(heads=4, kv_heads=4, strategy="default", feature_layer=-2), 1),
    "gqa-full": (RandomLlavaSpec(heads=4, kv_heads=2, strategy="full", feature_layer=-2, hidden=96, intermediate=160), 2),
    "mqa-layer-1": (RandomLlavaSpec(image_size=84, heads=4, kv_heads=1, strategy="default", feature_layer=-1,
                                    vision_layers=2, layers=3, vocab=300), 3),
}

# model_type (config.json; the key of vtc.export.models' registry) -> its tiny configs (TINY, TINY_IDEFICS3).
# Every registered architecture needs at least one (tests/test_registries.py checks it).
TINY_BY_MODEL_TYPE: dict[str, tuple[str, ...]] = {
    "llava": ("mha-default", "gqa-full", "mqa-layer-1"),
    "smolvlm": ("smolvlm-gqa",),
    "idefics3": ("idefics3-mqa",),
    "qwen2_5_vl": ("qwen25-tied", "qwen25-windows"),
    "qwen2_vl": ("qwen2-vl",),
}


def write_siglip_llava(path):
    """A tiny LLaVA with a SigLIP vision tower: no [CLS] token (methods that need one must refuse it)."""
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=100)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=4)
    LlavaForConditionalGeneration(config).save_pretrained(path)
    # a complete checkpoint (tokenizer, image processor), so the refusal comes from the method, not a missing file
    from transformers import CLIPImageProcessor

    from vtc.export.random_llava import DEFAULT_WORDS
    from vtc.export.wordtok import LLAVA15_CHAT_TEMPLATE, save_word_level_tokenizer

    save_word_level_tokenizer(path, list(DEFAULT_WORDS), LLAVA15_CHAT_TEMPLATE)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(path)
    return path


# Idefics3 / SmolVLM (SigLIP without [CLS], pixel-shuffle connector, Llama LM): conftest.py writes them (ALL_TINY)
# with vtc.export.random_idefics3 (every matrix normal(0, 0.2), so greedy tokens depend on the image). Tiles of
# 64 / 56 px, 8 x 8 patches shuffled 2 x 2 -> 16 tokens per image; the processor's size is 2 tiles a side.
def _idefics3_specs():
    from vtc.export.random_idefics3 import RandomIdefics3Spec

    return {
        "smolvlm-gqa": (RandomIdefics3Spec(arch="smolvlm"), 11),
        "idefics3-mqa": (RandomIdefics3Spec(arch="idefics3", image_size=56, patch_size=7, heads=4, kv_heads=1,
                                            hidden=48, intermediate=96, longest_edge=112), 12),
    }


TINY_IDEFICS3 = _idefics3_specs()


def write_tiny_idefics3(root, name: str):
    """Write TINY_IDEFICS3[name] under `root`; returns the checkpoint directory."""
    from vtc.export.random_idefics3 import write_random_idefics3

    spec, seed = TINY_IDEFICS3[name]
    return write_random_idefics3(root / name, spec, seed)


# Every tiny config conftest.py writes (`tiny_checkpoints`), of every architecture.
ALL_TINY: tuple[str, ...] = (*TINY, *TINY_IDEFICS3, "qwen25-tied", "qwen25-windows", "qwen2-vl")


def write_tiny(root, name: str):
    """Write the tiny checkpoint `name` (any of ALL_TINY) under `root` with its architecture's writer."""
    if name in TINY_IDEFICS3:
        return write_tiny_idefics3(root, name)
    if name.startswith("qwen"):  # TINY_QWEN, defined below
        return write_tiny_qwen(root, name)
    from vtc.export.random_llava import write_random_llava

    spec, seed = TINY[name]
    return write_random_llava(root / name, spec, seed)


# Qwen2.5-VL / Qwen2-VL (ViT with 2-D RoPE, no [CLS]; windowed attention; 2x2 patch merger; Qwen2 LM with M-RoPE):
# tests/test_qwen2_5_vl.py writes them with vtc.export.random_qwen (every matrix normal(0, 0.2)). name: (spec, seed,
# the build's --image-size). In ALL_TINY, TINY_BY_MODEL_TYPE and the parity matrix.
def _qwen_specs():
    from vtc.export.random_qwen import RandomQwenSpec

    return {
        # tied embeddings; 112 x 112 -> 4 x 4 merged tokens in one 4 x 4 window
        "qwen25-tied": (RandomQwenSpec(tie_embeddings=True, window_size=112, fullatt_block_indexes=(1,)), 21, (112, 112)),
        # 168 x 224 -> 6 x 8 merged tokens in 3 x 3 windows (2 x 3 of them, the last column padded), full attention
        # at blocks 1 and 3 of 4; grouped-query LM of 3 layers
        "qwen25-windows": (RandomQwenSpec(window_size=84, vision_layers=4, fullatt_block_indexes=(1, 3), layers=3,
                                          heads=4, kv_heads=1), 22, (168, 224)),
        "qwen2-vl": (RandomQwenSpec(arch="qwen2_vl"), 23, (112, 112)),
    }


TINY_QWEN = _qwen_specs()


def write_tiny_qwen(root, name: str):
    """Write TINY_QWEN[name] under `root`; returns the checkpoint directory."""
    from vtc.export.random_qwen import write_random_qwen

    spec, seed, _ = TINY_QWEN[name]
    return write_random_qwen(root / name, spec, seed)
