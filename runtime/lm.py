"""The language model side of the runtime: one graph (`llm`), or two segments split at a work layer
(`llm_pre` = layers [0, W), `llm_post` = [W, L)) with an in-LLM token selection between them at
prefill (FastV: the `select` graph; TokenCarve: vtc.runtime.selectors, exact, numpy).

All segments share one StaticKVCache; each writes only its own layers' new entries. Decode runs the
segments in order on one token. Positions are always the ORIGINAL ones: a pruned prompt keeps its
tokens' positions and decode continues at the unpruned prompt length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from vtc.runtime import selectors
from vtc.runtime.errors import ArtifactError
from vtc.runtime.kv_cache import StaticKVCache


@dataclass
class Segment:
    session: object
    first: int  # layers [first, end)
    end: int
    has_head: bool


@dataclass
class Pruned:
    """What an in-LLM selection kept: image tokens (0-based in the image span) and merge map [N]."""

    image_kept: list
    merged_into: list


class LanguageModel:
    def __init__(self, manifest, sessions: dict, cache: StaticKVCache):
        m = manifest
        self.m, self.cache, self.c = m, cache, m.compression
        if self.c.stage == "llm":
            w = self.c.work_layer
            self.segments = [Segment(sessions["llm_pre"], 0, w, False), Segment(sessions["llm_post"], w, m.lm.num_layers, True)]
        else:
            self.segments = [Segment(sessions["llm"], 0, m.lm.num_layers, True)]
        self.select = sessions.get("select")
        if self.c.stage == "llm" and self.c.method == "fastv" and self.select is None:
            raise ArtifactError("this FastV artifact has no select graph.", "Rebuild the artifact.")
        d = m.lm.hidden_size
        # Decode feeds: persistent arrays (bound once by the backend), views of the cache for the past.
        self._step = [self._feeds(seg, np.zeros((1, 1, d), np.float32), np.zeros((1, 1), np.int64), decode=True)
                      for seg in self.segments]
        self.position = 0
        self.last_pruned: Pruned | None = None
        self.last_select_ms = 0.0  # the in-LLM selection's own time at the last prefill

    @property
    def backend_seconds(self) -> float:
        return sum(s.session.seconds for s in self.segments) + (self.select.seconds if self.select else 0.0)

    def _feeds(self, seg: Segment, hidden, positions, decode: bool, logits_index=None) -> dict:
        feeds = {("inputs_embeds" if seg.first == 0 else "hidden_states"): hidden, "position_ids": positions,
                 "past_lengths": self.cache.lengths[seg.first:seg.end],
                 **self.cache.past_feeds(empty=not decode, layers=range(seg.first, seg.end))}
        if seg.has_head:
            feeds["logits_index"] = np.zeros(1, np.int64) if logits_index is None else logits_index
        return feeds

    def prefill(self, embeds: np.ndarray, image_start: int) -> np.ndarray:
        """embeds [1, T, D] -> last-position logits [V]; fills the cache (pruning in between if any)."""
        self.cache.reset()
        self.last_pruned = None
        seq = embeds.shape[1]
        hidden, positions = embeds, np.arange(seq, dtype=np.int64)[None]
        for seg in self.segments:
            last = np.array([hidden.shape[1] - 1], np.int64)
            outs = seg.session.run(self._feeds(seg, hidden, positions, decode=False, logits_index=last))
            if seg.has_head:
                self.cache.write(outs[1:], first=seg.first)
                self.position = seq
                return outs[0][0]
            hidden, last_attn = outs[0], outs[1]
            self.cache.write(outs[2:], first=seg.first)
            hidden, positions = self._prune(hidden, last_attn, image_start, seg)
        raise ArtifactError("the LLM segments end without an LM head.", "Rebuild the artifact.")

    def _prune(self, hidden, last_attn, image_start: int, seg: Segment):
        """In-LLM selection between segments: (hidden [1, S', D], positions [1, S'] original)."""
        t0 = time.perf_counter()
        hidden, keep = self._select(hidden, last_attn, image_start, seg)
        self.last_select_ms = (time.perf_counter() - t0) * 1e3
        return hidden, keep

    def _select(self, hidden, last_attn, image_start: int, seg: Segment):
        n, k = self.c.n_visual, self.c.k_visual
        if self.c.method == "fastv":
            hidden, keep = self.select.run({"hidden_states": hidden, "last_attn": last_attn,
                                            "image_start": np.array([image_start], np.int64)})
            keep = keep[0]
            image = keep[(keep >= image_start) & (keep < image_start + n)] - image_start
            merged = np.full(n, -1, np.int64)
            merged[image] = np.arange(image.shape[0])
            self.last_pruned = Pruned(image.tolist(), merged.tolist())
        elif self.c.method == "tokencarve":
            sel = selectors.tokencarve(hidden[0], last_attn[0], image_start, n, k, self.c.options["weight"])
            hidden, keep = sel.hidden[None], sel.keep
            self.last_pruned = Pruned(sel.image_kept.tolist(), sel.merged_into.tolist())
            self.cache.compact(range(seg.first, seg.end), keep)
        else:
            raise ArtifactError(f"no in-LLM selection for method {self.c.method!r}.", "Rebuild the artifact.")
        return np.ascontiguousarray(hidden), keep[None].astype(np.int64)

    def decode(self, token_embed: np.ndarray) -> np.ndarray:
        """token_embed [D] at the next position -> logits [V]."""
        hidden = token_embed
        for seg, feeds in zip(self.segments, self._step):
            key = "inputs_embeds" if seg.first == 0 else "hidden_states"
            feeds[key][0, 0] = hidden.reshape(-1)
            feeds["position_ids"][0, 0] = self.position
            outs = seg.session.run(feeds)
            self.cache.write(outs[1:] if seg.has_head else outs[2:], first=seg.first)
            if seg.has_head:
                self.position += 1
                return outs[0][0]
            hidden = outs[0]
        raise ArtifactError("the LLM segments end without an LM head.", "Rebuild the artifact.")
