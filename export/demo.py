"""The built-in demo model: a LLaVA-architecture checkpoint with RANDOM weights (its text is meaningless).

It is a normal HF checkpoint (config.json, model.safetensors, tokenizer, preprocessor config, chat
template) written deterministically from a seed into the user cache on first use, so the default
`vtc-export build` needs no download. Shapes are LLaVA-1.5's where they matter for compression
(336 px, 14 px patches -> 24x24 = 576 visual tokens, feature layer -2, "default" strategy); widths
and depths are small so the whole pipeline runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

DEMO_VERSION = 1
DEMO_NOTICE = "demo model: random weights, its text is meaningless (it exercises the pipeline, not accuracy)"

_WORDS = """
a an the this that these those is are was were be been it its there here what which who where when how why
yes no not and or but of in on at to from with without by for over under above below left right top bottom
middle center front behind near far inside outside up down one two three four five six seven eight nine ten
many few some all none more less most image picture photo scene object objects thing things shape shapes
color colour colours colors red green blue yellow orange purple pink brown black white gray grey dark light
bright small large big tiny huge long short tall wide round square circle triangle rectangle star line lines
dot dots grid pattern texture background foreground corner edge side person people man woman child dog cat
bird car tree house sky water road grass cloud sun can you see describe tell me about count how many much do
does did has have had show shows shown looks look like appears there's i it's please answer question answer
""".split()

CHAT_TEMPLATE_NOTE = "LLaVA-1.5 conversation format: 'USER: <image>\\n{question} ASSISTANT:'"


def cache_root() -> Path:
    return Path(os.environ.get("VTC_CACHE", Path.home() / ".cache" / "vtc"))


def demo_dir() -> Path:
    return cache_root() / f"demo-llava-v{DEMO_VERSION}"


def ensure_demo_checkpoint(progress=None) -> Path:
    """Path of the demo checkpoint, writing it (atomically) if it is not there yet."""
    target = demo_dir()
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_demo_checkpoint(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_demo_checkpoint(out: Path, seed: int = 0) -> None:
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from vtc.export.wordtok import LLAVA15_CHAT_TEMPLATE, save_word_level_tokenizer

    vocab = save_word_level_tokenizer(out, sorted(set(_WORDS)), LLAVA15_CHAT_TEMPLATE)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                              image_size=336, patch_size=14, projection_dim=128)
    text = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=2048, bos_token_id=1,
                       eos_token_id=2, pad_token_id=0, initializer_range=0.05)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=4, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", image_seq_length=576)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    model.save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(out)
    (out / "README.md").write_text(f"# vtc demo model (v{DEMO_VERSION})\n\n{DEMO_NOTICE}.\n\n"
                                   f"Seed {seed}; {CHAT_TEMPLATE_NOTE}; written by vtc.export.demo.\n")
    (out / "vtc_demo.json").write_text(json.dumps({"demo": True, "version": DEMO_VERSION, "seed": seed}) + "\n")


def is_demo(checkpoint_dir: Path) -> bool:
    return (Path(checkpoint_dir) / "vtc_demo.json").is_file()
