"""`visionzip`: dominant tokens by [CLS] attention plus contextual merged tokens (VisionZip).

Paper: VisionZip, arXiv 2412.04467. Reference: dvlab-research/VisionZip @ 3151f6d,
visionzip/clip_encoder.py `CLIPVisionTower_VisionZip.forward` (selection and merging),
visionzip/utils.py `CLIPAttention_forward` (metric = raw keys averaged over heads) and `apply_info`
(the metric is taken at layers[-2], the block that produces LLaVA's feature layer), visionzip/main.py
`visionzip(model, dominant, contextual)` (dominant count includes [CLS]: dominant_num = dominant - 1).

All on the encoder block that produces the feature layer (LLaVA-1.5: layers[-2]), T = 1 + Np tokens:
  h [T, Dv]  feature-layer hidden states ([CLS] at 0);  a_j = sum_heads softmax(q_cls k^T * s)_j,
  m [T, Dh]  that block's keys k_proj(ln1(x)) averaged over heads.
Dominant (D tokens): [CLS] plus the D-1 patches with the largest a_j, in original order.
Contextual (C tokens): the M remaining tokens R (neither dominant nor [CLS], original order);
  m_hat = m_R / ||m_R||; targets = positions 0, s, 2s, ... (first C) of R with s = max(1, M // C);
  every other token of R joins the target with the largest m_hat_i . m_hat_t (argmax, first on ties);
  contextual_t = h_t + mean(h_i over tokens assigned to t)   (0 when none: counts clamped to 1).
Output [dominant..., contextual...] (the reference's order), projected by the projector: K = D + C.
kept_index: a dominant token's own index, a contextual token's target; token_map: every token's
output slot (the remaining ones: their contextual token), so nothing maps to -1.
Ranking uses the head-averaged attention (sum / H: same order). Ties: lower index first (a stable
descending sort, built from pairwise ranks), argmax takes the first maximum.

Budget: K = round(ratio*N) (at least 2). The reference's 64 = 54+10, 128 = 108+20, 192 = 162+30 are
all D = K * 54/64, so for any K: D = floor(K * 54/64 + 0.5) clipped to [1, K-1], C = K - D. Options
`dominant` / `contextual` (0 = derive) set the split as in the reference's API; both set: K = D + C.

Feature strategies (T = 1 + Np states; token_map / kept_index are over the N visual tokens):
  "full"    N = 1 + Np: [CLS] is a visual token and is always dominant, exactly the reference.
  "default" N = Np. cls=keep (default) is the reference: it hands the [CLS] state to the LLM as the
            first dominant token although LLaVA-1.5 normally drops it; that token stands for no visual
            token, so its kept_index is -1. cls=drop: D dominant patches, [CLS] not used at all.
Static shapes only: TopK, Gather, MatMul, one-hot comparisons (no NonZero, masks or scatter).
"""

from __future__ import annotations

import torch

from vtc.export.methods.base import Method, Option, Plan, budget
from vtc.runtime.errors import MethodError

RATIO_D, RATIO_K = 54, 64  # the reference's dominant : total


def split_budget(k: int) -> tuple[int, int]:
    """(dominant, contextual) for K total tokens, the reference's 54:10 proportion."""
    d = min(max(1, (k * RATIO_D * 2 + RATIO_K) // (2 * RATIO_K)), k - 1)  # floor(K*54/64 + 0.5)
    return d, k - d


def descending_order(score: torch.Tensor) -> torch.Tensor:
    """score [n] -> indices [n] by descending score, the lower index first on ties (a stable sort).

    Ranks come from pairwise comparisons, so the final sort has distinct keys and eager PyTorch and
    ONNX TopK agree on ties (torch.onnx cannot export a stable sort)."""
    idx = torch.arange(score.shape[0])
    ahead = (score[None, :] > score[:, None]) | ((score[None, :] == score[:, None]) & (idx[None, :] < idx[:, None]))
    rank = ahead.to(torch.int64).sum(dim=1)  # [n]: a permutation of 0..n-1
    return torch.sort(rank).indices


def top_sorted(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [k] of the k largest scores (lower index first on ties), in ascending index order."""
    return torch.sort(descending_order(score)[:k]).values


def complement(chosen: torch.Tensor, t: int, count: int) -> torch.Tensor:
    """The `count` indices of 0..T-1 that are neither in `chosen` [c] nor 0, ascending (TopK on a key)."""
    idx = torch.arange(t, dtype=torch.int64)
    taken = idx == 0  # [T]
    if chosen.shape[0]:  # (an empty `any` is not False in ONNX Runtime)
        taken = taken | (idx[:, None] == chosen[None, :]).any(dim=1)
    key = idx + taken.to(torch.int64) * t
    return torch.sort(key).indices[:count]


def slot_map(members: torch.Tensor, slots: torch.Tensor, t: int) -> torch.Tensor:
    """[T]: slots[j] for the index members[j], -1 where absent (one-hot sum, no scatter)."""
    hit = torch.arange(t, dtype=torch.int64)[:, None] == members[None, :]  # [T, P]
    mapped = (hit.to(torch.int64) * slots[None, :]).sum(dim=1)
    return torch.where(hit.any(dim=1), mapped, torch.full_like(mapped, -1))


def contextual_tokens(states: torch.Tensor, metric: torch.Tensor, rest: torch.Tensor, contextual: int):
    """The reference's contextual merge over the remaining tokens rest [M] (state indices) ->
    (tokens [C, Dv], targets [C], others [M-C], assign [M-C]: each other's target 0..C-1)."""
    m = rest.shape[0]
    step = max(1, m // contextual)
    tpos = list(range(0, m, step))[:contextual]  # static positions in `rest`
    opos = [i for i in range(m) if i not in set(tpos)]
    tgt, oth = rest[tpos], rest[opos]  # [C], [M-C]
    if not opos:  # every remaining token is a target (empty tensors would not export cleanly)
        return states[tgt], tgt, oth, oth
    key = metric[rest]
    key = key / key.norm(dim=-1, keepdim=True)  # [M, Dh]
    sim = key[opos] @ key[tpos].transpose(0, 1)  # [M-C, C]
    assign = sim.argmax(dim=1)  # [M-C], first maximum on ties
    one_hot = (assign[:, None] == torch.arange(contextual)[None, :]).to(states.dtype)  # [M-C, C]
    counts = one_hot.sum(dim=0).clamp(min=1)[:, None]  # [C, 1]
    return states[tgt] + one_hot.transpose(0, 1) @ states[oth] / counts, tgt, oth, assign


def visionzip_select(attn: torch.Tensor, states: torch.Tensor, metric: torch.Tensor, dominant: int,
                     contextual: int, keep_cls: bool):
    """attn [Np] [CLS]->patch scores, states [T, Dv], metric [T, Dh] (T = 1 + Np) ->
    tokens [D+C, Dv], kept [D+C] and token_map [T] as state indices ([CLS] = 0; -1 = unused)."""
    t = states.shape[0]
    n_top = dominant - int(keep_cls)  # dominant patches
    top = top_sorted(attn, n_top) + 1 if n_top else torch.zeros(0, dtype=torch.int64)  # [n_top]
    dom = torch.cat([torch.zeros(1, dtype=torch.int64), top]) if keep_cls else top  # [D] ascending
    rest = complement(top, t, t - 1 - n_top)  # [M] ascending: the remaining tokens (never [CLS])
    merged, tgt, oth, assign = contextual_tokens(states, metric, rest, contextual)
    tokens = torch.cat([states[dom], merged])  # [D+C, Dv]
    slots = torch.cat([torch.arange(dominant + contextual), dominant + assign])
    token_map = slot_map(torch.cat([dom, tgt, oth]), slots, t)  # [T]
    return tokens, torch.cat([dom, tgt]), token_map


class VisionZip(Method):
    name = "visionzip"
    where = "vision encoder (feature layer)"
    requires = frozenset({"cls_token"})
    summary = "Dominant tokens by [CLS] attention plus contextual tokens merged by key similarity."
    paper = "VisionZip, arXiv 2412.04467"
    reference = "github.com/dvlab-research/VisionZip @ 3151f6d visionzip/clip_encoder.py"
    options = (
        Option("dominant", int, 0, "Dominant tokens D incl. [CLS] when kept (0 = K*54/64, the reference's split)."),
        Option("contextual", int, 0, "Contextual (merged) tokens C >= 1 (0 = K - D)."),
        Option("cls", str, "keep", "'default' strategy only: keep the [CLS] state as a dominant token (the "
                                   "reference) or drop it."),
    )

    def feasible_k(self, spec, ratio, options) -> int:
        if len(spec.feature_layers) > 1:
            raise MethodError("visionzip reads one vision feature layer; this model concatenates "
                              f"{len(spec.feature_layers)}.", "Choose a method that works after the projector.")
        if options["cls"] not in ("keep", "drop"):
            raise MethodError(f"visionzip option cls={options['cls']!r} is not 'keep' or 'drop'.", None)
        if spec.has_cls and options["cls"] == "drop":
            raise MethodError("with the 'full' feature strategy [CLS] is a visual token; visionzip always keeps it.",
                              "Drop the option cls=drop.")
        keep_cls = spec.has_cls or options["cls"] == "keep"
        d, c = options["dominant"], options["contextual"]
        if not (d and c):
            k = max(2, budget(ratio, spec.num_tokens))
            d, c = (d, k - d) if d else (k - c, c) if c else split_budget(k)
        n_patches = spec.grid[0] * spec.grid[1]
        n_top = d - int(keep_cls)
        if d < 1 or c < 1 or n_top < 0 or d + c > spec.num_tokens or c > n_patches - n_top:
            raise MethodError(f"visionzip cannot make {d} dominant + {c} contextual tokens from {spec.num_tokens} "
                              "visual tokens.", "Use dominant >= 1, contextual >= 1 and dominant + contextual "
                              f"<= {spec.num_tokens}.")
        options.update(dominant=d, contextual=c, cls="keep" if keep_cls else "drop")
        return d + c

    def compress(self, feats, spec, plan: Plan):
        opts = plan.options
        keep_cls = opts["cls"] == "keep"
        _, keys = feats.queries_keys()  # [1, H, T, Dh]
        tokens, kept, token_map = visionzip_select(feats.cls_attn[0], feats.states[0], keys.mean(dim=1)[0],
                                                   opts["dominant"], opts["contextual"], keep_cls)
        embeds = feats.project(tokens[None])  # [1, K, D]
        if spec.has_cls:  # "full": state index = visual token index
            return embeds, kept[None], token_map[None]
        return embeds, (kept - 1)[None], token_map[1:][None]  # "default": patch p is state p+1


METHOD = VisionZip()
