"""Torch-free prompt formatting, tokenization and streaming detokenization.

Mirrors transformers 5.x: the chat template is rendered like ``utils.chat_template_utils.render_jinja_template``
and ``tokenizer.json`` is used the way ``tokenization_utils_tokenizers.TokenizersBackend`` uses it (the class
``AutoTokenizer`` picks for LLaVA checkpoints and for ``tokenizer_class: PreTrainedTokenizerFast``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

from vtc.runtime.errors import InputError, ModelError

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_class values transformers 5.x loads from tokenizer.json as is ("Fast" suffix dropped); for
# some architectures AutoTokenizer ignores tokenizer_class altogether (their adapter's `tokenizer_as_is`,
# recorded in the manifest: transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS).
AS_IS_TOKENIZER_CLASSES = {"", "PreTrainedTokenizer", "TokenizersBackend"}
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # byte-fallback tokens (Llama/SentencePiece style)


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, ``{}`` when the file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"Cannot parse {str(path)!r}: {err}.",
                         "Restore the file from the original checkpoint.") from err
    if not isinstance(data, dict):
        raise ModelError(f"{str(path)!r} is not a JSON object.", "Restore the file from the original checkpoint.")
    return data


def _pick_template(value: Any, where: str) -> str:
    """Mirror ``get_chat_template``: a string, or the template named "default" of a list/dict of templates."""
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        if not isinstance(value.get("default"), str):
            raise ModelError(f"{where} has several chat templates but none named 'default'.",
                             "Name one template 'default' or keep a single template.")
        value = value["default"]
    if not isinstance(value, str):
        raise ModelError(f"{where} has a chat template that is not a string.", "Fix the chat template.")
    return value


def find_chat_template(checkpoint_dir: Path) -> str | None:
    """The chat template, with ``ProcessorMixin.from_pretrained``'s precedence, then the tokenizer's."""
    d = Path(checkpoint_dir)
    processor_cfg = _read_json(d / "processor_config.json")
    if processor_cfg.get("chat_template") is not None:
        return _pick_template(processor_cfg["chat_template"], "processor_config.json")
    legacy = _read_json(d / "chat_template.json")
    if legacy.get("chat_template") is not None:
        return _pick_template(legacy["chat_template"], "chat_template.json")
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    tokenizer_cfg = _read_json(d / "tokenizer_config.json")
    if tokenizer_cfg.get("chat_template") is not None:
        return _pick_template(tokenizer_cfg["chat_template"], "tokenizer_config.json")
    return None


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers' ``AssistantTracker``, inactive)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """Mirror transformers' ``TemplateNamespace``: no underscore-prefixed attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja's Namespace
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _check_attr(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_attr(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_attr(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"Chat templates cannot set namespace attribute {name!r}.")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateDict:
    """Mirror transformers' ``TemplateDict``: ``dict(...)`` and ``dict.fromkeys(...)`` only."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    """Mirror ``chat_template_utils._cached_compile_jinja_template``'s environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as err:
        raise ModelError(f"The chat template is not valid Jinja: {err}.", "Fix or replace the chat template.") from err


def render_chat_template(template: str, user_text: str, image_token: str,
                         special_tokens: dict[str, str] | None = None) -> str:
    """Render one user turn (image, then text) with ``add_generation_prompt=True``, like ``apply_chat_template``.

    ``special_tokens`` are the template variables HF passes from ``tokenizer.special_tokens_map`` (bos_token, ...).
    """
    if image_token in user_text:
        raise InputError(f"The prompt contains the image token {image_token!r}.",
                         "Remove it: the image is placed by the chat template.")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]}]
    compiled = _compile(template)
    try:
        rendered = compiled.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=True, **(special_tokens or {}))
    except (jinja2.exceptions.TemplateError, TypeError, ValueError) as err:
        raise ModelError(f"The chat template failed to render: {err}.", "Fix or replace the chat template.") from err
    count = rendered.count(image_token)
    if count != 1:
        raise ModelError(
            f"The chat template rendered the image token {image_token!r} {count} times, not once.",
            "Use a chat template that renders {'type': 'image'} content as the image token.",
        )
    return rendered


def _token_str(value: Any) -> str | None:
    """A special token's text from a tokenizer_config value (a string or a serialized ``AddedToken``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _added_token(value: Any, special: bool) -> AddedToken:
    """An ``AddedToken`` from a string (special) or a serialized one, forced special when ``special``."""
    if not isinstance(value, dict):
        return AddedToken(str(value), special=True)
    keys = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
    fields = {k: value[k] for k in keys if k in value}
    return AddedToken(**{**fields, "special": bool(fields.get("special")) or special})


def _special_tokens(tcfg: dict) -> dict[str, Any]:
    """Named + model-specific special tokens, in the order ``PreTrainedTokenizerBase`` registers them."""
    named = {k: tcfg[k] for k in NAMED_SPECIAL_TOKENS if _token_str(tcfg.get(k)) is not None}
    extra = {k: v for k, v in tcfg.items() if k.endswith("_token") and k not in NAMED_SPECIAL_TOKENS
             and isinstance(v, str)}
    if isinstance(tcfg.get("extra_special_tokens"), dict):
        extra.update({k: v for k, v in tcfg["extra_special_tokens"].items() if _token_str(v) is not None})
    return {**named, **extra}


def _extra_token_list(tcfg: dict) -> list[Any]:
    """``extra_special_tokens`` (or legacy ``additional_special_tokens``) given as a list."""
    value = tcfg.get("extra_special_tokens") or tcfg.get("additional_special_tokens")
    return list(value) if isinstance(value, (list, tuple)) else []


def _tokens_to_add(tok: Tokenizer, tcfg: dict) -> list[AddedToken]:
    """Mirror ``TokenizersBackend.__init__``: config-declared and special tokens the backend must (re)register."""
    named = {_token_str(v) for v in _special_tokens(tcfg).values()}
    decoder = tcfg.get("added_tokens_decoder") or {}
    to_add = [_added_token(decoder[k], _token_str(decoder[k]) in named) for k in sorted(decoder, key=int)]
    known = {t.content for t in tok.get_added_tokens_decoder().values()} | {t.content for t in to_add}
    for value in [*_special_tokens(tcfg).values(), *_extra_token_list(tcfg)]:
        text = _token_str(value)
        if text is not None and text not in known:
            to_add.append(_added_token(value, True))
            known.add(text)
    return to_add


def _check_tokenizer_class(tcfg: dict, as_is: bool) -> None:
    """Refuse tokenizers that transformers 5.x rebuilds from vocab/merges instead of using tokenizer.json."""
    cls = str(tcfg.get("tokenizer_class") or "").removesuffix("Fast")
    if cls in AS_IS_TOKENIZER_CLASSES or as_is:
        return
    raise ModelError(
        f"tokenizer_class {cls!r} is rebuilt by transformers 5.x from its vocabulary (for this architecture), "
        "so tokenizer.json alone may not give the same token ids.",
        "Save the tokenizer transformers actually uses (AutoTokenizer(...).backend_tokenizer) as tokenizer.json "
        "with tokenizer_class 'TokenizersBackend'.",
    )


def _load_backend(directory: Path, tcfg: dict) -> Tokenizer:
    """Mirror ``TokenizersBackend`` loading ``tokenizer.json`` as is (add_bos/eos_token are ignored then)."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{str(path)!r} does not exist.", "Use a checkpoint with a fast tokenizer (tokenizer.json).")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a plain Exception for malformed files
        raise ModelError(f"Cannot load {str(path)!r}: {err}.",
                         "Restore the file from the original checkpoint.") from err
    tok.no_truncation()
    tok.no_padding()
    tok.encode_special_tokens = bool(tcfg.get("split_special_tokens", False))
    tok.add_tokens(_tokens_to_add(tok, tcfg))
    return tok


def _eos_ids(directory: Path, tok: Tokenizer, eos_token: str | None) -> frozenset[int]:
    """``generation_config.json`` (what ``generate`` uses), else config.json, else the tokenizer's eos_token
    (empty when none is declared)."""
    config = _read_json(directory / "config.json")
    candidates = [_read_json(directory / "generation_config.json").get("eos_token_id"), config.get("eos_token_id"),
                  (config.get("text_config") or {}).get("eos_token_id")]
    for value in candidates:
        if value is not None:
            return frozenset(int(v) for v in (value if isinstance(value, list) else [value]))
    eos_id = tok.token_to_id(eos_token) if eos_token else None
    return frozenset() if eos_id is None else frozenset([eos_id])


class StreamDecoder:
    """Incremental detokenization: ``feed`` one id, get only the new, final text.

    Every step decodes the whole sequence (exact; O(n) per token, ~0.15 ms at 2k tokens). Text is held back
    while it ends in U+FFFD (an incomplete multi-byte character) and while the last non-skipped token is a
    byte-fallback token ``<0xNN>``: the ByteFallback decoder turns a whole run of byte tokens into U+FFFDs if
    the run is not valid UTF-8, so a later byte can rewrite text decoded from earlier ones. The concatenation
    of all ``feed`` results and ``flush()`` equals ``decode(all_ids)``.
    """

    def __init__(self, text: TextProcessor):
        self._decode, self._byte_ids, self._skipped_ids = text.decode, text.byte_token_ids, text.special_token_ids
        self._ids: list[int] = []
        self._emitted = ""
        self._in_byte_run = False

    def feed(self, token_id: int) -> str:
        """Add one token id; return the newly final text ("" while it may still change)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if token_id not in self._skipped_ids:  # skipped special tokens do not end a run of byte tokens
            self._in_byte_run = token_id in self._byte_ids
        if self._in_byte_run:
            return ""
        text = self._decode(self._ids)
        return "" if text.endswith("\ufffd") else self._advance(text)

    push = feed  # alias

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished byte sequence decodes to U+FFFD, as in decode)."""
        return self._advance(self._decode(self._ids))

    @property
    def text(self) -> str:
        """All text returned so far."""
        return self._emitted

    def _advance(self, text: str) -> str:
        start = len(self._emitted)
        if not text.startswith(self._emitted):  # not expected with the held-back rules above
            start = next((i for i, (a, b) in enumerate(zip(text, self._emitted)) if a != b), len(text))
        self._emitted = text
        return text[start:]


class TextProcessor:
    """Prompt formatting + tokenization of one checkpoint/artifact directory, equal to its HF tokenizer."""

    def __init__(self, tokenizer: Tokenizer, tokenizer_config: dict, chat_template: str | None, image_token: str,
                 eos_token_ids: frozenset[int], image_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.special_tokens = {k: _token_str(v) for k, v in _special_tokens(tokenizer_config).items()}
        self.chat_template = chat_template
        self.image_token = image_token
        self.eos_token_ids = eos_token_ids
        cleanup = bool(tokenizer_config.get("clean_up_tokenization_spaces", False))
        is_bpe = type(tokenizer.model).__name__ == "BPE"
        self._clean_up = cleanup and (not is_bpe or bool(
            tokenizer_config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
        image_id = tokenizer.token_to_id(image_token)
        if image_id is None:
            raise ModelError(f"The tokenizer has no image token {image_token!r}.",
                             "Use the checkpoint's own tokenizer, or pass its image token.")
        self.image_token_id: int = image_id
        self.image_prompt = _check_image_prompt(image_prompt, image_token)

    @classmethod
    def from_dir(cls, directory: str | Path, image_token: str | None = None,
                 tokenizer_as_is: bool = False, image_prompt: str | None = None) -> TextProcessor:
        """Load tokenizer.json, tokenizer_config.json and the chat template of ``directory``.

        ``tokenizer_as_is`` (the architecture's: adapter / manifest) says, like ``AutoTokenizer``, that a
        declared tokenizer_class such as LlamaTokenizer is ignored (LLaVA); otherwise such a class would
        be rebuilt by transformers, and loading it is a ModelError. ``image_prompt`` (the manifest's
        ``text.image_prompt``): what the image token expands to (``expand_image``).
        """
        d = Path(directory)
        tcfg = _read_json(d / "tokenizer_config.json")
        if "added_tokens_decoder" not in tcfg:  # legacy: special_tokens_map.json overrides tokenizer_config
            tcfg.update(_read_json(d / "special_tokens_map.json"))
        _check_tokenizer_class(tcfg, tokenizer_as_is)
        tok = _load_backend(d, tcfg)
        specials = _special_tokens(tcfg)
        image_token = (image_token or _read_json(d / "processor_config.json").get("image_token")
                       or _token_str(specials.get("image_token")) or "<image>")
        eos = _eos_ids(d, tok, _token_str(specials.get("eos_token")))
        return cls(tok, tcfg, find_chat_template(d), image_token, eos, image_prompt)

    def format(self, user_text: str) -> str:
        """The chat-formatted prompt for one image + ``user_text`` (ModelError if there is no template)."""
        if self.chat_template is None:
            raise ModelError("The checkpoint has no chat template.", "Use a chat/instruct checkpoint with a template.")
        return render_chat_template(self.chat_template, user_text, self.image_token, self.special_tokens)

    def encode(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        """Exactly ``tokenizer(prompt, add_special_tokens=...)["input_ids"]`` of the HF tokenizer."""
        return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids

    def prompt_ids(self, user_text: str) -> list[int]:
        """``format`` + ``encode`` as ``ProcessorMixin.apply_chat_template(tokenize=True)`` does it
        (no special tokens added when the rendered prompt already starts with the BOS token)."""
        prompt = self.expand_image(self.format(user_text))
        bos = self.special_tokens.get("bos_token")
        return self.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))

    def expand_image(self, prompt: str) -> str:
        """The prompt with its image token replaced by ``image_prompt`` (the per-tile text around one image
        token per block of visual tokens, as Idefics3/SmolVLM processors expand it); as is without one."""
        return prompt if self.image_prompt is None else prompt.replace(self.image_token, self.image_prompt)

    def split_at_images(self, ids: Iterable[int], blocks: int, image_token_id: int | None = None) -> list[list[int]]:
        """The ids around `blocks` single image tokens: [before, between..., after] (blocks + 1 lists)."""
        ids = list(ids)
        target = self.image_token_id if image_token_id is None else image_token_id
        at = [i for i, t in enumerate(ids) if t == target]
        if len(at) != blocks:
            raise InputError(f"The prompt has {len(at)} image tokens (id {target}); this artifact places {blocks}.",
                             "Pass one image and a prompt that does not contain the image token itself.")
        edges = [-1, *at, len(ids)]
        return [ids[a + 1:b] for a, b in zip(edges, edges[1:])]

    def split_at_image(self, ids: Iterable[int], image_token_id: int | None = None) -> tuple[list[int], list[int]]:
        """The ids before and after the single image token."""
        ids = list(ids)
        target = self.image_token_id if image_token_id is None else image_token_id
        count = ids.count(target)
        if count != 1:
            raise InputError(f"The prompt has {count} image tokens (id {target}); exactly one is supported.",
                             "Pass one image and a prompt that does not contain the image token itself.")
        at = ids.index(target)
        return ids[:at], ids[at + 1:]

    def decode(self, ids: Iterable[int]) -> str:
        """``tokenizer.decode(ids, skip_special_tokens=True)`` of the HF tokenizer."""
        text = self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return _clean_up_tokenization(text) if self._clean_up else text

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder whose final text equals ``decode`` of all fed ids."""
        return StreamDecoder(self)

    @cached_property
    def byte_token_ids(self) -> frozenset[int]:
        """Ids of byte-fallback tokens ``<0xNN>`` (empty for ByteLevel / word-level vocabularies)."""
        return frozenset(i for t, i in self.tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(t))

    @cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that ``decode`` skips (added tokens flagged special)."""
        return frozenset(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)


def _check_image_prompt(image_prompt: str | None, image_token: str) -> str | None:
    """The image prompt of an artifact: a bounded string with at least one image token (ArtifactError)."""
    from vtc.runtime.errors import ArtifactError

    if image_prompt is None:
        return None
    if not isinstance(image_prompt, str) or len(image_prompt) > 65536 or image_token not in image_prompt:
        raise ArtifactError(f"text.image_prompt must be a string of at most 65536 characters that contains the "
                            f"image token {image_token!r}.", "Rebuild the artifact.")
    return image_prompt


def _clean_up_tokenization(text: str) -> str:
    """Mirror ``PreTrainedTokenizerBase.clean_up_tokenization``."""
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text
