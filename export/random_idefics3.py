"""Random-weight Idefics3 / SmolVLM checkpoints of real HF classes, written as normal checkpoint directories.

Used by the tests (tiny sizes) and tools/bench_smolvlm.py (SmolVLM-256M geometry). The directory has what a
real HuggingFaceTB checkpoint has: config.json, model.safetensors, generation_config.json, a byte-level BPE
tokenizer (trained here on a small fixed corpus) with SmolVLM's special tokens (`<fake_token_around_image>`,
`<global-img>`, `<row_r_col_c>`, `<end_of_utterance>`, ...), SmolVLM's chat template, the image processor's
preprocessor_config.json and processor_config.json (`image_seq_len`).

HF's default init gives tiny models whose greedy tokens repeat one token whatever the image; every matrix is
re-drawn from normal(0, `init_std`) so that tokens depend on the image and the step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
            "<image>", "<global-img>", *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)))
CORPUS = """User: Describe the image. Assistant: A red circle on the left, a blue square at the top.
What color is the shape? How many objects are there? Is there a green triangle below the star?
The picture shows a small dog next to a large tree, and the sky is light blue over the water.
Answer the question about this photo: where is the yellow car, and what is the person doing?
"""


@dataclass(frozen=True)
class RandomIdefics3Spec:
    """Sizes of a random Idefics3/SmolVLM. Defaults are tiny (tests); `smolvlm_256m()` gives the real geometry."""

    arch: str = "smolvlm"  # smolvlm | idefics3
    image_size: int = 64  # T: the vision encoder's side (= the processor's max_image_size)
    patch_size: int = 8
    scale_factor: int = 2
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    vocab: int = 0  # 0 = the tokenizer's size; larger values pad the vocabulary
    longest_edge: int = 128  # the processor's size["longest_edge"] (2 tiles a side)
    bpe_vocab: int = 420
    init_std: float = 0.2
    tie_embeddings: bool = False

    @staticmethod
    def smolvlm_256m() -> "RandomIdefics3Spec":
        """HuggingFaceTB/SmolVLM-256M-Instruct's published sizes: SigLIP 768 x 12 layers (12 heads, 3072 MLP) at
        512 px / 16 px patches, pixel shuffle 4 -> 64 tokens per image; SmolLM2-135M-style LM 576 x 30 layers,
        9 heads / 3 KV heads, 1536 MLP, vocab 49280, its own LM head (86M vision + 7M connector + 135M LM + 28M
        head = the published 256M); processor 2048 / 512 (4 x 4 tiles)."""
        return RandomIdefics3Spec(image_size=512, patch_size=16, scale_factor=4, vision_hidden=768, vision_layers=12,
                                  vision_heads=12, vision_intermediate=3072, hidden=576, layers=30, heads=9,
                                  kv_heads=3, intermediate=1536, vocab=49280, longest_edge=2048, bpe_vocab=2000,
                                  init_std=0.02, tie_embeddings=False)


def _save_tokenizer(out: Path, size: int) -> dict[str, int]:
    """tokenizer.json, tokenizer_config.json (SmolVLM's special-token attributes) and the chat template."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from vtc.export.wordtok import train_byte_level_bpe

    tok = train_byte_level_bpe(CORPUS, SPECIALS, size)
    tok.save(str(out / "tokenizer.json"))
    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in sorted(tok.get_added_tokens_decoder().items())}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "added_tokens_decoder": added,
           "bos_token": "<|im_start|>", "eos_token": "<end_of_utterance>", "pad_token": "<|endoftext|>",
           "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "model_max_length": 8192,
           "extra_special_tokens": {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                                    "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    # the template without its video branch is the one the published checkpoints ship
    (out / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    return {t: tok.token_to_id(t) for t in SPECIALS} | {"__size__": tok.get_vocab_size(with_added_tokens=True)}


def _config(spec: RandomIdefics3Spec, vocab: int, ids: dict):
    import transformers

    vision = dict(hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                  image_size=spec.image_size, patch_size=spec.patch_size)
    text = dict(model_type="llama", hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                vocab_size=vocab, max_position_embeddings=8192, bos_token_id=ids["<|im_start|>"],
                eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<|endoftext|>"], rope_theta=100000.0,
                tie_word_embeddings=spec.tie_embeddings)
    cls = transformers.SmolVLMConfig if spec.arch == "smolvlm" else transformers.Idefics3Config
    return cls(vision_config=vision, text_config=text, scale_factor=spec.scale_factor,
               image_token_id=ids["<image>"], tie_word_embeddings=spec.tie_embeddings)


def write_random_idefics3(out: Path, spec: RandomIdefics3Spec = RandomIdefics3Spec(), seed: int = 0,
                          dtype: str = "float32") -> Path:
    """Write a random-weight SmolVLM (or Idefics3) checkpoint to `out` (created), its weights stored in
    `dtype` (the published checkpoints are bfloat16); returns `out`."""
    import torch
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = _save_tokenizer(out, spec.bpe_vocab)
    vocab = max(spec.vocab, ids["__size__"])
    torch.manual_seed(seed)
    name = "SmolVLMForConditionalGeneration" if spec.arch == "smolvlm" else "Idefics3ForConditionalGeneration"
    model = getattr(transformers, name)(_config(spec, vocab, ids)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, spec.init_std)
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    processor = (transformers.SmolVLMImageProcessorPil if spec.arch == "smolvlm" else transformers.Idefics3ImageProcessorPil)
    processor(size={"longest_edge": spec.longest_edge}, max_image_size={"longest_edge": spec.image_size},
              do_image_splitting=True).save_pretrained(out)
    seq = (spec.image_size // spec.patch_size // spec.scale_factor) ** 2
    (out / "processor_config.json").write_text(json.dumps(
        {"image_seq_len": seq, "processor_class": "SmolVLMProcessor" if spec.arch == "smolvlm" else "Idefics3Processor"},
        indent=2) + "\n")
    return out
