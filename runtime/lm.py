"""The language model side of the runtime: one graph (`llm`), or two segments split at a work layer
(`llm_pre` = layers [0, W), `llm_post` = [W, L)) with an in-LLM token selection between them at
prefill: the selector the manifest names (vtc.runtime.selectors; FastV runs the `select` graph,
TokenCarve an exact numpy selection).

All segments share one StaticKVCache; each writes only its own layers' new entries. Decode runs the
segments in order on one token. Positions are always the ORIGINAL ones: a pruned prompt keeps its
tokens' positions and decode continues at the unpruned prompt length.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from vtc.runtime import positions, selectors
from vtc.runtime.errors import ArtifactError, InputError
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
        self.selector, self.selector_graphs = None, {}
        if self.c.stage == "llm":
            self.selector = selectors.get(self.c.selector)
            missing = [g for g in self.selector.graphs if g not in sessions]
            if missing:
                raise ArtifactError(f"this {self.c.method} artifact has no {', '.join(missing)} graph.", "Rebuild the artifact.")
            self.selector_graphs = {g: sessions[g] for g in self.selector.graphs}
        self.prefill_positions = positions.get(m.lm.rope)  # prompt layout -> position_ids ([1, S] or [3, 1, S])
        d = m.lm.hidden_size
        # Decode feeds: persistent arrays (bound once by the backend), views of the cache for the past.
        step_pos = self.prefill_positions.decode_shape
        self._step = [self._feeds(seg, np.zeros((1, 1, d), _hidden_dtype(seg.session)), np.zeros(step_pos, np.int64), decode=True)
                      for seg in self.segments]
        self._step_buffers = self.cache.allocations  # the cache buffers the decode views belong to
        self.position = 0
        self.last_pruned: Pruned | None = None
        self.last_select_ms = 0.0  # the in-LLM selection's own time at the last prefill

    @property
    def backend_seconds(self) -> float:
        return sum(s.session.seconds for s in self.segments) + sum(g.seconds for g in self.selector_graphs.values())

    def _feeds(self, seg: Segment, hidden, position_ids, decode: bool, logits_index=None) -> dict:
        feeds = {("inputs_embeds" if seg.first == 0 else "hidden_states"): hidden, "position_ids": position_ids,
                 "past_lengths": self.cache.lengths[seg.first:seg.end],
                 **self.cache.past_feeds(empty=not decode, layers=range(seg.first, seg.end))}
        if seg.has_head:
            feeds["logits_index"] = np.zeros(1, np.int64) if logits_index is None else logits_index
        return feeds

    def prefill(self, embeds: np.ndarray, image_start: int, kept=None, max_new_tokens: int | None = None) -> np.ndarray:
        """embeds [1, T, D] -> last-position logits [V]; fills the cache (pruning in between if any). `kept` [K]:
        the grid index of each visual token (the vision graph's kept_index; None = all, in order), which
        multimodal positions need (vtc.runtime.positions). `max_new_tokens`: the most tokens the decode will
        add, so the cache is sized for T + max_new_tokens positions (vtc.runtime.kv_cache's horizon)."""
        seq = embeds.shape[1]
        if max_new_tokens is not None and max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be 0 or more (got {max_new_tokens}).", "Pass how many tokens may follow.")
        self.cache.reset(seq, None if max_new_tokens is None else seq + max_new_tokens)
        self.last_pruned = None
        if kept is None:
            kept = np.arange(self.c.n_visual if self.c.stage == "llm" else self.c.k_visual)
        hidden, pos = embeds, self.prefill_positions(seq, image_start, kept, self.c.grid)
        self.position = int(pos.max()) + 1  # decode continues after the largest position
        for seg in self.segments:
            last = np.array([hidden.shape[1] - 1], np.int64)
            outs = seg.session.run(self._feeds(seg, hidden, pos, decode=False, logits_index=last))
            if seg.has_head:
                self.cache.write(outs[1:], first=seg.first)
                return outs[0][0]
            hidden, last_attn = outs[0], outs[1]
            self.cache.write(outs[2:], first=seg.first)
            hidden, pos = self._prune(hidden, last_attn, image_start, seg, pos)
        raise ArtifactError("the LLM segments end without an LM head.", "Rebuild the artifact.")

    def _prune(self, hidden, last_attn, image_start: int, seg: Segment, pos: np.ndarray):
        """In-LLM selection between segments: (hidden [1, S', D], the kept tokens' original positions pos[..., keep])."""
        t0 = time.perf_counter()
        hidden, keep = self._select(hidden, last_attn, image_start, seg)
        self.last_select_ms = (time.perf_counter() - t0) * 1e3
        return hidden, np.ascontiguousarray(pos[..., keep[0]])

    def _select(self, hidden, last_attn, image_start: int, seg: Segment):
        sel = self.selector(hidden[0], last_attn[0], image_start, self.c.n_visual, self.c.k_visual, self.c.options,
                            self.selector_graphs)
        self.last_pruned = Pruned(sel.image_kept.tolist(), sel.merged_into.tolist())
        if self.selector.trims_pre_kv:
            self.cache.compact(range(seg.first, seg.end), sel.keep)
        return np.ascontiguousarray(sel.hidden[None]), sel.keep[None].astype(np.int64)

    def decode(self, token_embed: np.ndarray) -> np.ndarray:
        """token_embed [D] at the next position -> logits [V]."""
        self.cache.reserve(int(self.cache.lengths.max()) + 1)  # grow before the step, never inside it
        if self._step_buffers != self.cache.allocations:  # re-allocated: bind the new views (once per bucket)
            for seg, feeds in zip(self.segments, self._step):
                feeds.update(self.cache.past_feeds(empty=False, layers=range(seg.first, seg.end)))
            self._step_buffers = self.cache.allocations
        hidden = token_embed
        for seg, feeds in zip(self.segments, self._step):
            key = "inputs_embeds" if seg.first == 0 else "hidden_states"
            feeds[key][0, 0] = hidden.reshape(-1)
            feeds["position_ids"][...] = self.position  # [1, 1] or [3, 1, 1]
            outs = seg.session.run(feeds)
            self.cache.write(outs[1:] if seg.has_head else outs[2:], first=seg.first)
            if seg.has_head:
                self.position += 1
                return outs[0][0]
            hidden = outs[0]
        raise ArtifactError("the LLM segments end without an LM head.", "Rebuild the artifact.")


def _hidden_dtype(session) -> np.dtype:
    """The dtype of a segment's hidden-state input (the graph dtype, build --dtype)."""
    from vtc.runtime.kv_cache import storage_dtype

    spec = next(t for t in session.spec.inputs if t.name in ("inputs_embeds", "hidden_states"))
    return storage_dtype(spec.dtype)
