"""The on-device VLM: preprocess -> vision graph -> prefill -> decode loop. numpy + a backend; no torch.

Top-down: `VLM.generate` = `prepare` (image + prompt) -> `encode_image` -> `prefill` -> `decode_step`...
The LLM graph takes embeddings: the runtime gathers text rows from `embed_tokens.npy` (memory-mapped)
and places the K visual embeddings where the prompt's single image token stands.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from vtc.runtime import manifest as mf
from vtc.runtime.backend import get_backend
from vtc.runtime.errors import InputError
from vtc.runtime.kv_cache import StaticKVCache, storage_dtype
from vtc.runtime.lm import LanguageModel
from vtc.runtime.preprocess import ImagePreprocessor, load_image
from vtc.runtime.sampling import Sampler, SamplingConfig
from vtc.runtime.text import StreamDecoder, TextProcessor


@dataclass
class Prompt:
    """Token ids around the image: text = before + [K visual tokens] + after. A tiled image (manifest
    `text.image_prompt` with B image tokens) is B blocks of K/B visual tokens with `between[i]` (the per-tile
    text) after block i: before + [block 0] + between[0] + ... + [block B-1] + after."""

    before: list[int]
    after: list[int]
    between: list[list[int]] = field(default_factory=list)

    @property
    def num_text(self) -> int:
        return len(self.before) + len(self.after) + sum(len(t) for t in self.between)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    stop_reason: str  # "eos" | "max_new_tokens"
    prompt_tokens: int  # text + visual tokens in the prefill
    kept_indices: list[int]  # [K] original index each visual token stands for
    token_map: list[int]  # [N] output visual token each original token went into, -1 = dropped
    timings_ms: dict = field(default_factory=dict)


class VLM:
    """A built artifact, opened for inference. Not thread-safe (one static KV cache)."""

    def __init__(self, artifact_dir: Path, backend=None, check_files: str | bool = "sizes", manifest=None,
                 open_graphs: bool = True):
        """Open `artifact_dir`: its manifest.json, validated, and its files checked at level `check_files`
        (vtc.runtime.manifest.load: "sizes" by default, "hashes" for every sha256, False when the caller
        checked them); `manifest`: an in-memory Manifest to use instead of the file (the build's parity
        check, before it writes one); `open_graphs=False`: tokenizer and preprocessing only, the graphs are
        opened by `open()` (the build prepares parity inputs before the PyTorch model is freed)."""
        self._t0 = time.perf_counter()
        self.load_ms = 0.0  # opening the artifact: manifest + file checks + tokenizer + every graph session
        self.dir = Path(artifact_dir)
        self.manifest = m = manifest if manifest is not None else mf.load(self.dir, check_files=check_files)
        self.backend = backend or get_backend()
        self.preprocessor = ImagePreprocessor.from_config(m.preprocess)
        self.text = TextProcessor.from_dir(self.dir, image_token=m.model.image_token, tokenizer_as_is=m.text.tokenizer_as_is,
                                           image_prompt=m.text.image_prompt)
        self.embed = np.load(self.dir / m.embeddings["file"], mmap_mode="r", allow_pickle=False)  # [V, D]
        if m.embeddings.get("dtype") == "bfloat16":  # stored as raw 16-bit words (.npy has no bfloat16)
            self.embed = self.embed.view(storage_dtype("bfloat16"))
        self.eos = set(m.text.eos_token_ids)
        self.vision = self.lm = self.cache = None
        if open_graphs:
            self.open()

    def open(self, graphs: tuple[str, ...] | None = None) -> None:
        """Open the graphs on the backend (all, or the `graphs` named: "vision", or the language model's),
        and the KV cache with the language model. A build with one copy of the weights in memory opens the
        vision graph, encodes, `close()`s it, then opens the rest (`generate_from(..., encoded=...)`)."""
        m = self.manifest
        names = list(m.graphs) if graphs is None else list(graphs)
        unknown = [n for n in names if n not in m.graphs]
        if unknown:
            raise InputError(f"this artifact has no graph {unknown[0]!r} (it has {', '.join(m.graphs)}).",
                             "Name graphs from the manifest's `graphs`.")
        if hasattr(self.backend, "prepare"):
            self.backend.prepare(m)
        sessions = {name: self.backend.open(self.dir, m.graphs[name]) for name in names}
        self.vision = sessions.pop("vision", None)
        self._pixel_dtype = storage_dtype(next(t.dtype for t in m.graphs["vision"].inputs if t.name == "pixel_values"))
        self.cache = self.lm = None
        if sessions:
            self.cache = StaticKVCache(m.lm.num_layers, m.lm.num_kv_heads, m.lm.head_dim, m.text.max_seq_len,
                                       m.kv_cache.layer_dtypes)
            self.lm = LanguageModel(m, sessions, self.cache)
        self.load_ms = (time.perf_counter() - self._t0) * 1e3

    def close(self) -> None:
        """Drop every open session and the KV cache (their memory goes back with them)."""
        self.vision = self.lm = self.cache = None

    # -- inputs ----------------------------------------------------------------------------------
    def prepare_prompt(self, prompt: str, raw: bool = False) -> Prompt:
        m = self.manifest
        if raw:
            if prompt.count(m.model.image_token) != 1:
                raise InputError(f"a --raw prompt must contain {m.model.image_token!r} exactly once "
                                 f"(found {prompt.count(m.model.image_token)}).",
                                 f"Put {m.model.image_token} where the image goes, or drop --raw to use the chat template.")
            ids = self.text.encode(self.text.expand_image(prompt))
        else:
            if m.text.chat_template is None:
                raise InputError("this artifact has no chat template.", "Pass --raw with a prompt that contains "
                                 f"{m.model.image_token}.")
            ids = self.text.prompt_ids(prompt)
        blocks = self.text.split_at_images(ids, self.image_blocks, m.model.image_token_id)
        p = Prompt(blocks[0], blocks[-1], blocks[1:-1])
        if p.num_text > m.text.budget:
            raise InputError(f"the prompt is {p.num_text} text tokens; this artifact was built for at most "
                             f"{m.text.budget}.", "Shorten the prompt, or rebuild with "
                             f"`vtc-export build --text-budget {p.num_text}` (or more).")
        return p

    @property
    def image_blocks(self) -> int:
        """B: blocks of visual tokens in a prompt (the image tokens of `text.image_prompt`; 1 without one)."""
        m = self.manifest
        blocks = 1 if m.text.image_prompt is None else m.text.image_prompt.count(m.model.image_token)
        if m.compression.k_visual % blocks or m.compression.n_visual % blocks:
            from vtc.runtime.errors import ArtifactError

            raise ArtifactError(f"text.image_prompt places {blocks} image blocks, which do not split "
                                f"{m.compression.k_visual} of {m.compression.n_visual} visual tokens evenly.",
                                "Rebuild the artifact.")
        return blocks

    def prepare_image(self, image) -> np.ndarray:
        """Path or PIL image -> pixel_values [1, 3, H, W] float32."""
        img = load_image(image) if isinstance(image, (str, Path)) else image
        return self.preprocessor(img)

    # -- graphs ----------------------------------------------------------------------------------
    def encode_image(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image_embeds [1, K, D], kept_index [1, K], token_map [1, N])."""
        if self.vision is None:
            raise InputError("the vision graph is not open.", "Call VLM.open() (or open(['vision'])) first.")
        embeds, kept, token_map = self.vision.run({"pixel_values": pixel_values.astype(self._pixel_dtype, copy=False)})
        self.last_kept = kept[0]  # the positions of these tokens, for a prefill not given `kept`
        return embeds, kept, token_map

    def prefill(self, prompt: Prompt, image_embeds: np.ndarray, kept: np.ndarray | None = None,
                max_new_tokens: int | None = None) -> np.ndarray:
        """Run the whole prompt once; fills the cache; returns last-position logits [V]. `kept` [K]: the vision
        graph's kept_index of `image_embeds` (multimodal positions need it; default: the last `encode_image`'s).
        `max_new_tokens`: how many decode steps may follow, so the cache is sized for them (None: it grows in
        powers of two)."""
        if self.lm is None:
            raise InputError("the language model's graphs are not open.", "Call VLM.open() first.")
        table = self.embed
        visual = np.split(image_embeds.astype(table.dtype), len(prompt.between) + 1, axis=1)  # B x [1, K/B, D]
        parts = [table[prompt.before][None]]
        for block, text in zip(visual, [*prompt.between, prompt.after]):
            parts += [block, table[text][None]]
        embeds = np.concatenate(parts, axis=1)  # [1, T, D]
        if embeds.shape[1] > self.cache.max_len:
            raise InputError(f"the prompt needs {embeds.shape[1]} cache positions; the cache has {self.cache.max_len}.",
                             "Rebuild with a larger --max-seq-len.")
        kept = getattr(self, "last_kept", None) if kept is None else kept
        return self.lm.prefill(embeds, image_start=len(prompt.before), kept=kept, max_new_tokens=max_new_tokens)

    def decode_step(self, token: int) -> np.ndarray:
        """Feed one token at the next position; returns its logits [V]."""
        return self.lm.decode(self.embed[token])

    # -- the loop --------------------------------------------------------------------------------
    def generate(self, image, prompt: str, raw: bool = False, max_new_tokens: int = 64,
                 sampling: SamplingConfig = SamplingConfig(), on_text: Callable[[str], None] | None = None
                 ) -> GenerationResult:
        t0 = time.perf_counter()
        p = self.prepare_prompt(prompt, raw)
        pixels = self.prepare_image(image)
        t1 = time.perf_counter()
        return self.generate_from(pixels, p, max_new_tokens, sampling, on_text, preprocess_ms=(t1 - t0) * 1e3)

    def check_room(self, prompt: Prompt, max_new_tokens: int) -> None:
        widest = max(self.manifest.compression.kv_visual_per_layer)  # in-LLM methods: N before pruning
        need = prompt.num_text + widest + max_new_tokens
        if need > self.cache.max_len:
            room = self.cache.max_len - prompt.num_text - widest
            raise InputError(f"--max-new-tokens {max_new_tokens} does not fit: the prompt uses "
                             f"{self.cache.max_len - room} of {self.cache.max_len} cache positions.",
                             f"Use --max-new-tokens {max(room, 0)} or less, or rebuild with a larger --max-seq-len.")

    def generate_from(self, pixel_values: np.ndarray, prompt: Prompt, max_new_tokens: int = 64,
                      sampling: SamplingConfig = SamplingConfig(), on_text=None, preprocess_ms: float = 0.0,
                      ignore_eos: bool = False, encoded: tuple | None = None) -> GenerationResult:
        """Generate from preprocessed pixels [1, 3, H, W]; `ignore_eos` always runs max_new_tokens (parity);
        `encoded`: what `encode_image(pixel_values)` returned, to reuse (its vision time is then 0)."""
        if max_new_tokens < 1:
            raise InputError(f"--max-new-tokens must be at least 1 (got {max_new_tokens}).", "Pass a positive number.")
        self.check_room(prompt, max_new_tokens)
        stream = StreamDecoder(self.text)
        t0 = time.perf_counter()
        sampler = Sampler(sampling)
        image_embeds, kept, token_map = encoded if encoded is not None else self.encode_image(pixel_values)
        t1 = time.perf_counter()
        logits = self.prefill(prompt, image_embeds, kept[0], max_new_tokens)
        t_prefill = time.perf_counter()
        token = sampler(logits)
        t2 = time.perf_counter()
        backend_s0 = self.lm.backend_seconds
        tokens, stop, step_ms = [], "max_new_tokens", []
        while True:
            tokens.append(token)
            if token in self.eos and not ignore_eos:
                stop = "eos"
                break
            if on_text is not None:
                piece = stream.feed(token)
                if piece:
                    on_text(piece)
            if len(tokens) >= max_new_tokens:
                break
            ts = time.perf_counter()
            token = sampler(self.decode_step(token))
            step_ms.append((time.perf_counter() - ts) * 1e3)
        if on_text is not None:
            tail = stream.flush()
            if tail:
                on_text(tail)
        timings = {"preprocess": preprocess_ms, "vision": (t1 - t0) * 1e3, "prefill": (t_prefill - t1) * 1e3,
                   "first_token": (t2 - t_prefill) * 1e3,
                   "select": self.lm.last_select_ms,  # in-LLM selection, part of prefill
                   "ttft": preprocess_ms + (t2 - t0) * 1e3,
                   "decode_per_token": float(np.mean(step_ms)) if step_ms else 0.0,
                   # time inside the backend's LLM calls per decode step; the rest is runtime overhead
                   "decode_backend_per_token": (self.lm.backend_seconds - backend_s0) * 1e3 / len(step_ms) if step_ms else 0.0,
                   "total": preprocess_ms + (time.perf_counter() - t0) * 1e3}
        text_ids = [t for t in tokens if t not in self.eos]
        if self.lm.last_pruned is not None:  # in-LLM methods: the selection made at prefill
            kept, token_map = np.array([self.lm.last_pruned.image_kept]), np.array([self.lm.last_pruned.merged_into])
        return GenerationResult(text=self.text.decode(text_ids), token_ids=tokens, stop_reason=stop,
                                prompt_tokens=prompt.num_text + self.manifest.compression.k_visual,
                                kept_indices=kept[0].tolist(), token_map=token_map[0].tolist(),
                                timings_ms=timings)
