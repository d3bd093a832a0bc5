"""In-LLM token selections: what runs between the LLM segments at prefill (numpy; no torch).

A registry of selectors by name. The manifest records the selector of an in-LLM method
(`compression.selector`); the runtime (vtc.runtime.lm) and the export side's PyTorch reference
(`InLLMMethod.run_selector`) both call the selector found here, so the deployed selection is the one
that is checked. A selector gets layer W-1's output hidden states and last-token attention, and the
graphs it declares (`graphs`: runtime sessions, or their eager stand-ins in the reference).

    fastv       runs the artifact's select.onnx (TopK in the graph); layers < W keep the full KV
    tokencarve  TokenCarve's IPGS needs an SVD, which ONNX does not have: it runs here, exactly, in
                float64; layers < W are trimmed to the kept tokens too (tests check it against a
                transcription of the published code)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vtc.runtime.errors import ArtifactError


@dataclass(frozen=True)
class Selection:
    keep: np.ndarray  # [S'] int64: original positions of the kept tokens, ascending
    hidden: np.ndarray  # [S', D]: hidden states entering layer W (merged where TokenCarve merged)
    image_kept: np.ndarray  # [K] int64: kept image tokens, 0-based within the image span, ascending
    merged_into: np.ndarray  # [N] int64: image token -> kept image token (0..K-1) it went into, -1 = dropped


class Selector:
    """One in-LLM selection. `graphs`: names of artifact graphs it runs; `trims_pre_kv`: whether the
    cache of layers < W is gathered to the kept tokens too (else they keep the full prompt)."""

    name: str = ""
    graphs: tuple[str, ...] = ()
    trims_pre_kv: bool = False
    option_bounds: dict = {}  # compression.options it reads -> (low, high), checked when a manifest loads

    def __call__(self, hidden: np.ndarray, last_attn: np.ndarray, image_start: int, n: int, k: int,
                 options: dict, graphs: dict) -> Selection:
        """hidden [S, D], last_attn [S] of layer W-1 -> the Selection (S' = S - N + K tokens kept)."""
        raise NotImplementedError


_REGISTRY: dict[str, Selector] = {}


def register(selector: Selector) -> Selector:
    _REGISTRY[selector.name] = selector
    return selector


def get(name: str | None) -> Selector:
    if name not in _REGISTRY:
        raise ArtifactError(f"the artifact asks for the in-LLM selection {name!r}, which this vtc does not have "
                            f"(it has {', '.join(_REGISTRY)}).", "Upgrade vtc, or rebuild the artifact with this vtc.")
    return _REGISTRY[name]


def from_keep(keep: np.ndarray, hidden: np.ndarray, image_start: int, n: int) -> Selection:
    """A pure selection (no merging) from the kept original positions keep [S'] (ascending)."""
    keep = np.asarray(keep, np.int64)
    image = keep[(keep >= image_start) & (keep < image_start + n)] - image_start
    merged = np.full(n, -1, np.int64)
    merged[image] = np.arange(image.shape[0])
    return Selection(keep=keep, hidden=hidden, image_kept=image, merged_into=merged)


def _descending(values: np.ndarray) -> np.ndarray:
    """Indices by value, descending; ties: lower index first (the documented tie-break)."""
    return np.lexsort((np.arange(values.shape[0]), -values))


def borda_scores(attn: np.ndarray, sv: np.ndarray, weight: float) -> np.ndarray:
    """[N]: a token at rank r (0 = best) of a ranking gets (N - r) points, weighted `weight` for the
    attention ranking and `1 - weight` for the SVD ranking (TokenCarve's Index_weighting)."""
    n = attn.shape[0]
    points = np.arange(n, 0, -1, dtype=np.float64)
    score = np.zeros(n)
    score[_descending(attn)] += points * weight
    score[_descending(sv)] += points * (1.0 - weight)
    return score


def svd_contribution(x: np.ndarray) -> np.ndarray:
    """[N]: row L1 norms of U*S for X = U S V^T, TokenCarve's information rank, in float64.

    U*S is computed from a symmetric eigendecomposition on the smaller side instead of an SVD (4x
    faster at 576 x 1024): X X^T = U S^2 U^T gives U*S = U sqrt(lambda) (N <= D); X^T X = V S^2 V^T
    gives U*S = X V (D < N). Exact in exact arithmetic; the sign ambiguity of each singular vector
    vanishes in |.|. Tests check the selection against the reference's SVD."""
    x = x.astype(np.float64)
    if x.shape[0] <= x.shape[1]:
        lam, u = np.linalg.eigh(x @ x.T)
        return np.abs(u * np.sqrt(np.clip(lam, 0.0, None))[None, :]).sum(axis=1)
    _, v = np.linalg.eigh(x.T @ x)
    return np.abs(x @ v).sum(axis=1)


def tokencarve(hidden: np.ndarray, last_attn: np.ndarray, image_start: int, n: int, t: int,
               weight: float = 0.5) -> Selection:
    """TokenCarve's two-stage IPGS (arXiv 2503.10501; ShawnTan86/TokenCarve @ a57bd59,
    TokenCarve/modeling_llama.py, LlamaModel.forward at the work layer).

    hidden [S, D]: layer W-1's output; last_attn [S]: head-averaged attention of the last prompt token
    in layer W-1. Stage 1 keeps R = int(1.5 T) image tokens by Borda-combined attention and SVD ranks
    (score order); stage 2 splits them into A (first R/2) and B, merges the M = min(R/2, int(T/2))
    B tokens most similar (cosine, layer W-1 output) to their best A partner into it (mean including
    the partner), keeps A + the other B: T image tokens. Text tokens are all kept.
    """
    x = hidden.astype(np.float64)
    span = slice(image_start, image_start + n)
    r = int(1.5 * t)
    order = _descending(borda_scores(last_attn[span].astype(np.float64), svd_contribution(x[span]), weight))[:r]
    half = int(0.5 * r)
    a, b = order[:half], order[half:]
    metric = x[span] / np.linalg.norm(x[span], axis=-1, keepdims=True)
    sim = metric[b] @ metric[a].T  # [|B|, |A|]
    best = np.argmax(sim, axis=-1)  # first maximum: lower A position on ties
    m = min(half, int(t / 2))
    by_sim = _descending(sim[np.arange(b.shape[0]), best])
    merged_b, kept_b = by_sim[:m], by_sim[m:]
    image = x[span].copy()
    sums, counts = image[a].copy(), np.ones(half)
    np.add.at(sums, best[merged_b], x[span][b[merged_b]])
    np.add.at(counts, best[merged_b], 1.0)
    image[a] = sums / counts[:, None]
    image_kept = np.sort(np.concatenate([a, b[kept_b]]))
    slot = {int(tok): i for i, tok in enumerate(image_kept)}
    merged_into = np.full(n, -1, dtype=np.int64)
    for tok in image_kept:
        merged_into[tok] = slot[int(tok)]
    for j in merged_b:
        merged_into[b[j]] = slot[int(a[best[j]])]
    x[span] = image
    seq = hidden.shape[0]
    keep = np.concatenate([np.arange(image_start), image_kept + image_start, np.arange(image_start + n, seq)])
    return Selection(keep=keep.astype(np.int64), hidden=x[keep].astype(hidden.dtype),
                     image_kept=image_kept.astype(np.int64), merged_into=merged_into)


class FastVSelector(Selector):
    """FastV: the artifact's `select` graph keeps every text token and the top-K image tokens by the
    last token's attention (vtc.export.methods.fastv)."""

    name = "fastv"
    graphs = ("select",)

    def __call__(self, hidden, last_attn, image_start, n, k, options, graphs):
        kept, keep = graphs["select"].run({"hidden_states": np.ascontiguousarray(hidden[None]),
                                           "last_attn": np.ascontiguousarray(last_attn[None]),
                                           "image_start": np.array([image_start], np.int64)})
        return from_keep(keep[0], kept[0], image_start, n)


class TokenCarveSelector(Selector):
    name = "tokencarve"
    trims_pre_kv = True
    option_bounds = {"weight": (0.0, 1.0)}

    def __call__(self, hidden, last_attn, image_start, n, k, options, graphs):
        with one_blas_thread():
            return tokencarve(hidden, last_attn, image_start, n, k, options["weight"])


_CONTROLLER = None


def one_blas_thread():
    """numpy's BLAS limited to one thread (threadpoolctl, ~0.1 ms). TokenCarve's matrices are small (N x D); a
    multi-threaded OpenBLAS spins against ONNX Runtime's intra-op threads on a small CPU (measured on a busy
    2-core host: the selection took 75-1788 ms, p50 1254, and 14-23 ms on one BLAS thread)."""
    global _CONTROLLER
    from threadpoolctl import ThreadpoolController

    _CONTROLLER = _CONTROLLER or ThreadpoolController()
    return _CONTROLLER.limit(limits=1, user_api="blas")


register(FastVSelector())
register(TokenCarveSelector())
