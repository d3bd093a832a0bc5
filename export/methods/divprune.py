"""`divprune`: keep a maximally diverse subset of the projected visual tokens (greedy k-center).

DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
CVPR 2025, arXiv 2503.02175). Reference: github.com/vbdi/divprune @ 799e2d9,
LLaVA/llava/model/llava_arch.py, `pairwise_cosine_similarity` and `DivPrune` (applied at LAYER_INDEX=0,
i.e. to the projected image embeddings the language model sees).

Math, on the N projected tokens x_1..x_N (rows of embeds[0], [N, D]):
  distance   d(i, j) = 1 - <x_i/|x_i|, x_j/|x_j|>     ([N, N]: 1 - cosine similarity)
  first pick s_1 = argmax_j  second-smallest_i d(i, j)   (column j's smallest is normally its own
             diagonal ~0, so this is the token farthest from its nearest neighbour; the reference's
             `topk(m, 2, dim=0, largest=False).values[1]`)
  then       s_t = argmax_j  min_{r < t} d(s_r, j)       (max-min / farthest-point / k-center greedy)
K = max(1, round(ratio * N)) picks, over all N visual tokens (with the "full" feature strategy [CLS]
is one of them and competes like any other token, as in the reference, which runs on whatever image
tokens the LM sees). The kept tokens are emitted in original order (sorted indices), unmerged.

Tie-break: ArgMax returns the lowest index among equal maxima (torch.argmax and ONNX ArgMax with
select_last_index=0 agree), as in the reference.

Static-shape export: a Python loop of K steps unrolled at trace time. State: the running minimum
distance to the selected set `mind` [1, N] and a selected mask `taken` [N] (bool). One step is
Gather (row d(s_t, :)) -> Min -> Equal against arange (one-hot) -> Or -> Where -> ArgMax, plus a
Reshape of the index: 7 nodes; no NonZero, no scatter, no boolean indexing, no Loop op. K = 144 of
576: ~1,100 nodes in vision.onnx, ~5-6 s to export (2-core CPU).

Deviation from the reference (one guard): tokens already selected are excluded from later argmaxes
(score -inf). The reference leaves them in with their own distance d(s, s) ~ 0 (fp residue); it can
only re-pick one when every unselected token is within that residue of the selected set (exact or
near duplicates, e.g. a flat image region). It then returns a duplicate index, i.e. fewer than K
distinct tokens; here it picks the next unselected duplicate instead (same content, K distinct
indices, a well-defined token_map). On inputs without such duplicates the selections are identical.
The reference runs in the model dtype (fp16 for LLaVA-1.5 eval); vtc computes in float32.
"""

from __future__ import annotations

import torch

from vtc.export.methods.base import Method, Plan, gather_sorted


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """x [N, D] -> 1 - cosine similarity [N, N], computed as the reference does (divide by the norm)."""
    xn = x / x.norm(dim=1, keepdim=True)  # [N, D]
    return 1.0 - torch.mm(xn, xn.t())  # [N, N]


def greedy_max_min(dist: torch.Tensor, k: int) -> torch.Tensor:
    """dist [N, N] -> the k picks [K] int64, in selection order (unrolled: k static steps)."""
    n = dist.shape[0]
    ids = torch.arange(n, dtype=torch.int64)  # [N]
    score = torch.topk(dist, 2, dim=0, largest=False, sorted=True).values[1:2]  # [1, N] nearest-other distance
    taken = torch.zeros(n, dtype=torch.bool)  # [N] selected mask
    neg_inf = torch.full((n,), float("-inf"), dtype=dist.dtype)  # [N]
    picks = []
    for step in range(k):
        pick = torch.argmax(score, dim=1)  # [1] lowest index among ties
        picks.append(pick)
        if step == k - 1:
            break
        row = torch.index_select(dist, 0, pick)  # [1, N]  d(pick, :)
        mind = row if step == 0 else torch.minimum(mind, row)  # [1, N]  min distance to the selected set
        taken = taken | (ids == pick)  # [N]  one-hot update, no scatter
        score = torch.where(taken, neg_inf, mind)  # [1, N]
    return torch.cat(picks)  # [K]


class DivPrune(Method):
    name = "divprune"
    where = "after projector"
    summary = ("Greedy max-min (k-center) selection of the K most diverse projected tokens, "
               "distance 1 - cosine; kept in original order.")
    paper = "DivPrune, CVPR 2025 (arXiv 2503.02175)"
    reference = "github.com/vbdi/divprune @ 799e2d9 (LLaVA/llava/model/llava_arch.py)"

    def compress(self, feats, spec, plan: Plan):
        embeds = feats.embeds  # [1, N, D]
        picks = greedy_max_min(cosine_distance(embeds[0]), plan.k)  # [K]
        return gather_sorted(embeds, picks)  # ([1, K, D], [1, K], [1, N])


METHOD = DivPrune()
