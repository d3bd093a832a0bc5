"""A tiny word-level tokenizer saved as a normal Hugging Face tokenizer directory.

Used for small test/toy checkpoints: ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it offline (as
``TokenizersBackend``, i.e. ``PreTrainedTokenizerFast``) and ``vtc.runtime.text.TextProcessor`` gives the same ids.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, processors

from vtc.runtime.errors import ExportError

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")  # ids 0..4, in this order

# llava-hf/llava-1.5-*-hf's template: "USER: <image>\n{text} ASSISTANT:" (images before text in each turn).
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split on whitespace, then isolate every punctuation character."""
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def _vocab(words: list[str]) -> dict[str, int]:
    """Special tokens at 0..4, then each distinct (lowercased, pre-tokenized) word piece in first-seen order."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    splitter, lower = _pre_tokenizer(), normalizers.Lowercase()
    for word in words:
        for piece, _ in splitter.pre_tokenize_str(lower.normalize_str(word)):
            vocab.setdefault(piece, len(vocab))
    return vocab


def _build(words: list[str]) -> Tokenizer:
    """WordLevel model + lowercase normalizer + whitespace/punctuation pre-tokenizer + ``<s>`` post-processor."""
    tok = Tokenizer(models.WordLevel(vocab=_vocab(words), unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _tokenizer_config(tok: Tokenizer) -> dict:
    """A ``tokenizer_config.json`` that transformers 5.x loads as ``TokenizersBackend``."""
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "image_token": "<image>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }


def save_word_level_tokenizer(out_dir: Path, words: list[str], chat_template: str) -> int:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja to ``out_dir``; return the vocab size.

    Ids: ``<pad>``=0, ``<s>``=1, ``</s>``=2, ``<unk>``=3, ``<image>``=4, then the words (lowercased, split on
    whitespace and punctuation like the pre-tokenizer does, duplicates dropped).
    """
    out = Path(out_dir)
    tok = _build(list(words))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if ids != {t: i for i, t in enumerate(SPECIAL_TOKENS)}:
        raise ExportError(f"Word-level tokenizer special token ids are {ids}, expected 0..4.",
                          "Report this as a vtc bug.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tok.save(str(out / "tokenizer.json"))
        (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2) + "\n",
                                                   encoding="utf-8")
        (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    except OSError as err:
        raise ExportError(f"Cannot write the tokenizer to {str(out)!r}: {err}.",
                          "Check the output directory is writable and has free space.") from err
    return tok.get_vocab_size(with_added_tokens=True)


def train_byte_level_bpe(corpus: str, specials, size: int) -> Tokenizer:
    """A byte-level BPE (the kind SmolLM2 and Qwen2 use) of `size` tokens trained on `corpus`, `specials`
    first (ids 0..): the tokenizers of the tiny random SmolVLM / Qwen checkpoints."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=[AddedToken(t, special=True, normalized=False)
                                                                   for t in specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus] * 4, trainer=trainer)
    return tok

