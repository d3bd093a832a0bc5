"""vtc.runtime.preprocess / vtc.runtime.text / vtc.export.wordtok against transformers' own processors (offline)."""

from __future__ import annotations

import io
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import (  # noqa: E402
    AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers)
from transformers import AutoTokenizer, CLIPImageProcessorPil, LlavaImageProcessorPil, LlavaProcessor  # noqa: E402

from vtc.export.wordtok import LLAVA15_CHAT_TEMPLATE, save_word_level_tokenizer  # noqa: E402
from vtc.runtime.errors import InputError, ModelError  # noqa: E402
from vtc.runtime.preprocess import ImagePreprocessor, load_image  # noqa: E402
from vtc.runtime.text import StreamDecoder, TextProcessor, find_chat_template, render_chat_template  # noqa: E402

# llava-hf/llava-1.5-7b-hf preprocessor_config.json
LLAVA15_PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor", "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
CONFIGS = {
    "clip336": LLAVA15_PREPROCESSOR,
    "clip224_defaults": {"image_processor_type": "CLIPImageProcessor"},
    "llava_pad": {**LLAVA15_PREPROCESSOR, "image_processor_type": "LlavaImageProcessor", "do_pad": True},
    "fixed_hw_bilinear": {"image_processor_type": "CLIPImageProcessorFast", "size": {"height": 200, "width": 300},
                          "do_center_crop": False, "resample": 2, "crop_pct": 0.5},  # crop_pct: ignored by CLIP
    "legacy_int_sizes_crop_pads": {"image_processor_type": "CLIPImageProcessor", "size": 100, "crop_size": 150},
}
IMAGES = [(480, 640, "RGB"), (640, 480, "RGB"), (1000, 99, "RGB"), (99, 1000, "RGB"), (7, 5, "RGB"), (2, 50, "RGB"),
          (336, 336, "RGB"), (300, 200, "RGBA"), (123, 457, "L"), (50, 60, "LA"), (80, 90, "P")]
TEXTS = ["USER: <image>\nWhat is shown in this image? ASSISTANT:", "héllo 東京 🙂", "  leading  spaces\n\ttab",
         "a<image>b", "<s>x</s>", "", "The quick brown fox\n\n jumps!", "émoji 🙂🙂 and 日本語"]
SENTENCES = ["USER: What is shown in this image? ASSISTANT: A cat sitting on a mat.",
             "The quick brown fox jumps over the lazy dog.", "Hello world, hello there!",
             "Describe the picture in detail."] * 3


def _image(h: int, w: int, mode: str) -> Image.Image:
    arr = np.random.default_rng(h * 7919 + w).integers(0, 256, (h, w, 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA")
    if mode == "P":
        img = img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
        img.info["transparency"] = 0
        return img
    return img if mode == "RGBA" else img.convert(mode)


def _hf_processor(cfg: dict):
    cls = LlavaImageProcessorPil if cfg["image_processor_type"].startswith("Llava") else CLIPImageProcessorPil
    return cls(**{k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_preprocessor_equals_transformers_slow_processor(name: str) -> None:
    cfg = CONFIGS[name]
    ours, hf = ImagePreprocessor.from_config(cfg), _hf_processor(cfg)
    for h, w, mode in IMAGES:
        img = _image(h, w, mode)
        ref = hf(img, return_tensors="np")["pixel_values"]
        out = ours(img)
        assert out.dtype == np.float32 and out.shape == ref.shape == (1, 3, *ours.output_hw)
        assert np.abs(out - ref).max() <= 1e-5, (name, h, w, mode)
    assert ImagePreprocessor.from_config(json.loads(json.dumps(ours.to_dict()))) == ours


def test_load_image_equals_transformers_given_a_path(tmp_path) -> None:
    rgba, rotated = tmp_path / "rgba.png", tmp_path / "rotated.jpg"
    _image(64, 48, "RGBA").save(rgba)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    _image(40, 70, "RGB").save(rotated, exif=exif)
    ours, hf = ImagePreprocessor.from_config(LLAVA15_PREPROCESSOR), _hf_processor(LLAVA15_PREPROCESSOR)
    for path in (rgba, rotated):
        img = load_image(path)
        assert img.mode == "RGB"
        assert np.abs(ours(img) - hf(str(path), return_tensors="np")["pixel_values"]).max() <= 1e-5
    assert load_image(rotated).size == (40, 70)


@pytest.mark.parametrize("cfg, key", [
    ({"image_processor_type": "SiglipImageProcessor"}, "SiglipImageProcessor"),
    ({}, "(none given)"),
    ({"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 10, "longest_edge": 20}}, "size"),
    ({"image_processor_type": "CLIPImageProcessor", "resample": 9}, "resample"),
    ({"image_processor_type": "CLIPImageProcessor", "use_square_size": True}, "use_square_size"),
    ({"image_processor_type": "CLIPImageProcessor", "do_pad": True, "pad_size": {"height": 9, "width": 9}}, "pad_size"),
])
def test_preprocessor_rejects_unsupported_configs(cfg: dict, key: str) -> None:
    with pytest.raises(ModelError, match=key):
        ImagePreprocessor.from_config(cfg)


def test_load_image_errors(tmp_path) -> None:
    (tmp_path / "notes.png").write_text("this is not an image")
    buf = io.BytesIO()
    _image(256, 256, "RGB").save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    cases = {tmp_path / "missing.jpg": "does not exist", tmp_path: "directory",
             tmp_path / "notes.png": "Cannot read", tmp_path / "cut.jpg": "Cannot read"}
    for path, what in cases.items():
        with pytest.raises(InputError, match=what) as err:
            load_image(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError):
        ImagePreprocessor.from_config(LLAVA15_PREPROCESSOR)(np.zeros((4, 4, 3), np.uint8))


def _save_bpe(out, kind: str, tokenizer_class: str, model_type: str | None) -> None:
    """A Llama-style byte-fallback BPE (llava-1.5's tokenizer.json layout) or a ByteLevel BPE, BOS by post-processor."""
    byte_level = kind == "bytelevel"
    tok = Tokenizer(models.BPE(unk_token=None if byte_level else "<unk>", byte_fallback=not byte_level,
                               fuse_unk=not byte_level))
    if byte_level:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        alphabet = []
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + ([] if byte_level else [f"<0x{b:02X}>" for b in range(256)]))}
    tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                           initial_alphabet=alphabet))
    trained = json.loads(tok.to_str())["model"]
    for t in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok.model = models.BPE(vocab=vocab, merges=merges, unk_token=None if byte_level else "<unk>",
                           byte_fallback=not byte_level, fuse_unk=not byte_level)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials + ["<image>", "<pad>"]])
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": tokenizer_class, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "pad_token": "<pad>", "add_bos_token": True, "legacy": False, "clean_up_tokenization_spaces": False,
           "chat_template": "{{ bos_token }}{% set ns = namespace(n=0) %}"
                            "{% for m in messages %}{{ m['role'] | upper }}: "
                            "{% for c in m['content'] %}{% if loop.index > 9 %}{% break %}{% endif %}"
                            "{% set ns.n = ns.n + 1 %}{% if c['type'] == 'image' %}<image>\n{% else %}"
                            "{{ c['text'] | tojson }}{% endif %}{% endfor %}{% endfor %}"
                            "{% if add_generation_prompt %} ({{ ns.n }} parts) ASSISTANT:{% endif %}"}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    if model_type:
        (out / "config.json").write_text(json.dumps({"model_type": model_type, "text_config": {"eos_token_id": 2}}))


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tok")
    words = "USER ASSISTANT What is shown in this image ? a cat sitting on mat . hello héllo 東京 world don't"
    words = words.split()
    # 5 special tokens + 22 distinct lowercased pieces ("don't" -> "don", "'", "t"; "What" == "what")
    assert save_word_level_tokenizer(root / "word", words + ["what"], LLAVA15_CHAT_TEMPLATE) == 5 + 22
    _save_bpe(root / "llava_bpe", "fallback", "LlamaTokenizer", "llava")
    _save_bpe(root / "fast_bpe", "fallback", "PreTrainedTokenizerFast", None)
    _save_bpe(root / "bytelevel", "bytelevel", "PreTrainedTokenizerFast", None)
    _save_bpe(root / "llama_rebuilt", "fallback", "LlamaTokenizer", None)
    return {p.name: p for p in root.iterdir()}


def _text(tok_dirs, name: str) -> TextProcessor:
    """llava_bpe declares LlamaTokenizer, which AutoTokenizer ignores for LLaVA (the adapter's tokenizer_as_is)."""
    from vtc.export.models.llava import ADAPTER

    return TextProcessor.from_dir(tok_dirs[name], tokenizer_as_is=name == "llava_bpe" and ADAPTER.tokenizer_as_is)


@pytest.mark.parametrize("name", ["word", "llava_bpe", "fast_bpe", "bytelevel"])
def test_text_processor_equals_auto_tokenizer(tok_dirs, name: str) -> None:
    hf, ours = AutoTokenizer.from_pretrained(str(tok_dirs[name])), _text(tok_dirs, name)
    assert type(hf).__name__ == "TokenizersBackend"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.format("What is shown?") == prompt
    assert ours.prompt_ids("What is shown?") == hf(prompt, add_special_tokens=not prompt.startswith("<s>"))["input_ids"]
    for text in TEXTS + [prompt]:
        assert ours.encode(text) == hf(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    before, after = ours.split_at_image(ours.encode(prompt), hf.convert_tokens_to_ids("<image>"))
    assert before + [ours.image_token_id] + after == ours.encode(prompt)
    rng = random.Random(0)
    for _ in range(30):
        ids = [rng.randrange(len(hf)) for _ in range(rng.randrange(1, 25))]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.eos_token_ids == {2}


@pytest.mark.parametrize("name", ["word", "llava_bpe", "bytelevel"])
def test_stream_decoder_concatenation_equals_decode(tok_dirs, name: str) -> None:
    ours = _text(tok_dirs, name)
    rng = random.Random(1)
    vocab = ours.tokenizer.get_vocab_size(with_added_tokens=True)
    sequences = [ours.encode(t) for t in TEXTS] + [[rng.randrange(vocab) for _ in range(40)] for _ in range(40)]
    for ids in sequences:
        stream, pieces = ours.stream_decoder(), []
        pieces = [stream.feed(i) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == ours.decode(ids)
    stream = StreamDecoder(ours)
    pieces = [stream.push(i) for i in ours.encode("héllo 東京 🙂 ok")]
    assert "".join(pieces) == ours.decode(ours.encode("héllo 東京 🙂 ok")) and "\ufffd" not in "".join(pieces)


def test_rebuilt_llama_tokenizer_is_refused(tok_dirs) -> None:
    with pytest.raises(ModelError, match="rebuilt by transformers"):
        TextProcessor.from_dir(tok_dirs["llama_rebuilt"])
    # an architecture whose AutoTokenizer ignores tokenizer_class (LLaVA's adapter: tokenizer_as_is)
    assert TextProcessor.from_dir(tok_dirs["llama_rebuilt"], tokenizer_as_is=True).encode("hi") == \
        TextProcessor.from_dir(tok_dirs["llava_bpe"], tokenizer_as_is=True).encode("hi")


def test_errors_and_image_token_checks(tok_dirs) -> None:
    ours = TextProcessor.from_dir(tok_dirs["word"])
    for ids in ([1, 5, 6], [1, 4, 5, 4]):
        with pytest.raises(InputError, match="image tokens"):
            ours.split_at_image(ids, 4)
    with pytest.raises(InputError, match="image token"):
        ours.format("look: <image>")
    with pytest.raises(ModelError, match="0 times"):
        render_chat_template("{% for m in messages %}{{ m['content'][1]['text'] }}{% endfor %}", "hi", "<image>")
    with pytest.raises(ModelError, match="boom"):
        render_chat_template("{{ raise_exception('boom') }}", "hi", "<image>")
    with pytest.raises(ModelError, match="namespace attribute"):
        render_chat_template("{% set ns = namespace(_x=1) %}<image>", "hi", "<image>")


def test_llava_processor_end_to_end(tok_dirs, tmp_path) -> None:
    """What LlavaForConditionalGeneration receives from HF's LlavaProcessor (the image token expanded to 576)."""
    d = tmp_path / "ckpt"
    save_word_level_tokenizer(d, ["what", "is", "this", "?"], LLAVA15_CHAT_TEMPLATE)
    (d / "preprocessor_config.json").write_text(json.dumps({**LLAVA15_PREPROCESSOR, "size": {"shortest_edge": 999}}))
    (d / "processor_config.json").write_text(json.dumps({"image_processor": LLAVA15_PREPROCESSOR}))  # wins (5.x)
    hf = LlavaProcessor(image_processor=_hf_processor(LLAVA15_PREPROCESSOR),
                        tokenizer=AutoTokenizer.from_pretrained(str(d)), patch_size=14, num_additional_image_tokens=1,
                        vision_feature_select_strategy="default", chat_template=LLAVA15_CHAT_TEMPLATE)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    img = _image(300, 500, "RGB")
    out = hf(images=img, text=hf.apply_chat_template(messages, add_generation_prompt=True), return_tensors="np")
    text, pre = TextProcessor.from_dir(d), ImagePreprocessor.from_dir(d)
    before, after = text.split_at_image(text.prompt_ids("What is this?"), 4)
    assert out["input_ids"][0].tolist() == before + [4] * 576 + after
    assert np.abs(out["pixel_values"] - pre(img)).max() <= 1e-5


def test_find_chat_template_precedence(tmp_path) -> None:
    assert find_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "tok"}]}))
    assert find_chat_template(tmp_path) == "tok"
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert find_chat_template(tmp_path) == "jinja"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "legacy"}))
    assert find_chat_template(tmp_path) == "legacy"
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "proc"}))
    assert find_chat_template(tmp_path) == "proc"


def test_eos_token_ids_prefer_generation_config(tok_dirs, tmp_path) -> None:
    d = tmp_path / "w"
    save_word_level_tokenizer(d, ["a"], LLAVA15_CHAT_TEMPLATE)
    assert TextProcessor.from_dir(d).eos_token_ids == {2}  # tokenizer_config eos_token
    (d / "config.json").write_text(json.dumps({"model_type": "llava", "text_config": {"eos_token_id": 7}}))
    assert TextProcessor.from_dir(d).eos_token_ids == {7}
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert TextProcessor.from_dir(d).eos_token_ids == {2, 5}
