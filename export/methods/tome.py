"""`tome`: Token Merging (bipartite soft matching) inside every vision-encoder block up to the feature layer.

Paper: Token Merging: Your ViT But Faster, arXiv 2210.09461. Reference: facebookresearch/ToMe @ af95e4b,
tome/merge.py `bipartite_soft_matching` (class_token=True) and `merge_wavg`, tome/patch/timm.py
`ToMeBlock.forward` / `ToMeAttention.forward` (proportional attention, metric = keys averaged over heads).

Per block l (T tokens, [CLS] at position 0, sizes s [T] = how many original tokens each one holds):
  y = x + Attn(ln1(x)) with proportional attention: softmax(q k^T * scale + log s_j) over keys j;
  metric m = keys k_proj(ln1(x)) averaged over heads, m_hat = m / ||m||;
  A = tokens at even positions, B = odd positions; score(a, b) = m_hat_a . m_hat_b; [CLS] (A[0])
  scores -inf; each a picks its best b (first on ties); the r_l a-tokens with the highest best score
  (stable descending sort: lower index first on ties) are merged into their b:
  y_b <- (s_b y_b + sum s_a y_a) / (s_b + sum s_a), s_b <- s_b + sum s_a;
  new order = [unmerged A in original A order, all of B]   (exactly the reference's order);
  x = y' + MLP(ln2(y')).
Tokens after the feature layer: T0 - sum(r_l). Then the feature strategy ("default" drops [CLS],
"full" keeps it as visual token 0) and the projector.
Output order (a deviation, see below): tokens sorted by their representative = the lowest original
index in the group (kept_index); token_map[i] = output token holding original token i (never -1).

Schedule: K = round(ratio*N); the last feature-layer count is K (+1 for the dropped [CLS] with
"default"). Total reduction R = T0 - that is spread as evenly as possible over the L blocks that
run (ceil(remaining / layers left) each, so earlier blocks take the extra token), raised in a block
where the 50% cap r_l <= (T_l - 1) // 2 of later blocks could not otherwise reach K. Greedy maximal
merging gives the smallest reachable K_min; a request below it uses K_min only when that is
ceil(ratio*N) (a rounding), otherwise MethodError. Option `r` instead applies ToMe's own constant
schedule (r per block, capped at 50%), and K follows from it.
Static shapes: r_l is fixed per block; merges use TopK (sort), Gather, one-hot MatMul, no scatter.
Deviation from the reference: the final tokens are re-ordered by representative (the project keeps
visual tokens in image order; ToMe's order is an artefact of the A/B split, irrelevant to a
classifier). Within the encoder the reference's order is kept, since it decides the next split.
"""

from __future__ import annotations

import torch

from vtc.export.methods.base import Method, Option, Plan, budget
from vtc.export.methods.visionzip import descending_order
from vtc.runtime.errors import MethodError


def after_max(t: int, layers: int) -> int:
    """Tokens left after `layers` blocks of maximal merging (r = (T-1)//2 each, [CLS] protected)."""
    for _ in range(layers):
        t -= (t - 1) // 2
    return t


def schedule(t0: int, layers: int, t_final: int) -> list[int]:
    """Per-block r, as even as possible, that takes T0 tokens to exactly t_final (see module doc)."""
    rs, t = [], t0
    for left in range(layers, 0, -1):
        need = t - t_final
        r = min(-(-need // left), (t - 1) // 2)
        while r < (t - 1) // 2 and after_max(t - r, left - 1) > t_final:
            r += 1
        rs.append(r)
        t -= r
    if t != t_final:
        raise MethodError(f"tome cannot merge {t0} tokens to {t_final} in {layers} blocks.", None)
    return rs


def constant_schedule(t0: int, layers: int, r: int) -> list[int]:
    """ToMe's `model.r = r`: r per block, capped at (T-1)//2 as bipartite_soft_matching does."""
    rs, t = [], t0
    for _ in range(layers):
        rs.append(min(r, (t - 1) // 2))
        t -= rs[-1]
    return rs


def bipartite_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, r: int, class_token: bool = True):
    """One ToMe merge. x [T, C], size [T, 1], metric [T, Dh] ->
    (x [T-r, C], size [T-r, 1], new_pos [T]: the position each token's group has after the merge)."""
    t = x.shape[0]
    ta, tb = (t + 1) // 2, t // 2
    m = metric / metric.norm(dim=-1, keepdim=True)
    scores = m[0::2] @ m[1::2].transpose(0, 1)  # [Ta, Tb]
    if class_token:  # [CLS] (A[0]) is never merged
        scores = torch.cat([torch.full((1, tb), float("-inf"), dtype=scores.dtype), scores[1:]])
    node_max, node_idx = scores.max(dim=-1)  # [Ta]
    edge = descending_order(node_max)  # [Ta], lower index first on ties
    src, unm = edge[:r], edge[r:]  # [r], [Ta-r]
    if class_token:
        unm = torch.sort(unm).values
    dst = node_idx[src]  # [r]
    xs = x * size  # merge_wavg: sum of size-weighted tokens, then / summed size
    one_hot = (dst[:, None] == torch.arange(tb)[None, :]).to(x.dtype).transpose(0, 1)  # [Tb, r]
    size_b = size[1::2] + one_hot @ size[0::2][src]  # [Tb, 1]
    xb = xs[1::2] + one_hot @ xs[0::2][src]  # [Tb, C]
    new_size = torch.cat([size[0::2][unm], size_b])  # [T-r, 1]
    new_x = torch.cat([xs[0::2][unm], xb]) / new_size
    u = ta - r
    members = torch.cat([unm, src])  # a permutation of 0..Ta-1
    slots = torch.cat([torch.arange(u), u + dst])
    hit = (torch.arange(ta)[:, None] == members[None, :]).to(torch.int64)  # [Ta, Ta]
    pos_a = (hit * slots[None, :]).sum(dim=1)  # [Ta]
    pos_b = u + torch.arange(tb)  # [Tb]
    interleave = [i // 2 if i % 2 == 0 else ta + i // 2 for i in range(t)]  # static
    return new_x, new_size, torch.cat([pos_a, pos_b])[interleave]


def prop_attention(block, x: torch.Tensor, size: torch.Tensor):
    """The block's attention (HF eager math) plus log(size) on the logits (ToMe's proportional
    attention). x [1, T, Dv] block input, size [T, 1] -> (out [1, T, Dv], keys [1, H, T, Dh])."""
    t = x.shape[1]
    q, k, v = block.qkv(x)  # [1, H, T, Dh]
    logits = torch.matmul(q, k.transpose(-1, -2)) * block.scale + size.log().view(1, 1, 1, t)  # [1, H, T, T]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(1, t, -1)  # [1, T, H*Dh]
    return block.attn_out(out), k


def tome_block(block, x: torch.Tensor, size: torch.Tensor, r: int):
    """ToMeBlock.forward on a vision block (vtc.export.models.base.VisionBlock). x [1, T, Dv],
    size [T, 1] -> (x [1, T-r, Dv], size [T-r, 1], new_pos [T])."""
    out, keys = prop_attention(block, x, size)
    x = x + out
    if r > 0:
        merged, size, new_pos = bipartite_merge(x[0], size, keys.mean(dim=1)[0], r)
        x = merged[None]
    else:
        new_pos = torch.arange(x.shape[1])
    return block.mlp_residual(x), size, new_pos


def order_groups(x: torch.Tensor, token_map: torch.Tensor):
    """Sort the merged tokens x [1, Tf, Dv] by representative (lowest original index in the group).
    token_map [T0]: current position of each original token -> (x, kept [Tf], token_map [T0])."""
    t0, tf = token_map.shape[0], x.shape[1]
    hit = token_map[:, None] == torch.arange(tf)[None, :]  # [T0, Tf]
    rep = torch.where(hit, torch.arange(t0)[:, None], torch.full_like(hit, t0, dtype=torch.int64)).amin(dim=0)
    order = torch.sort(rep).indices  # [Tf] (representatives are distinct)
    inverse = torch.sort(order).indices  # [Tf]: output slot of each current token
    return x[:, order], rep[order], inverse[token_map]


class ToMe(Method):
    name = "tome"
    where = "inside every vision-encoder block"
    summary = "Merge similar tokens (bipartite soft matching, size-weighted) inside the ViT blocks."
    paper = "Token Merging (ToMe), arXiv 2210.09461"
    reference = "github.com/facebookresearch/ToMe @ af95e4b tome/merge.py"
    options = (Option("r", int, 0, "Tokens merged per block, ToMe's constant schedule (0 = derive from --ratio)."),)

    # ToMe protects the [CLS] token (as the reference does for ViTs with one); token counts differ
    # between layers, so it reads exactly one feature layer
    requires = frozenset({"cls_token", "single_feature_layer"})

    def feasible_k(self, spec, ratio, options) -> int:
        layers, t0 = spec.feature_layers[0], spec.grid[0] * spec.grid[1] + 1
        extra = 0 if spec.has_cls else 1  # "default" drops [CLS] after the encoder
        if options["r"]:
            rs = constant_schedule(t0, layers, options["r"])
            k = t0 - sum(rs) - extra
        else:
            k, k_min = budget(ratio, spec.num_tokens), after_max(t0, layers) - extra
            if k < k_min:
                if k_min - ratio * spec.num_tokens >= 1:
                    raise MethodError(f"tome merges at most ~half the tokens per block: {layers} blocks before the "
                                      f"feature layer keep at least {k_min} of {spec.num_tokens} tokens, not {k} "
                                      f"(ratio {ratio:g}).", f"Pass --ratio >= {k_min / spec.num_tokens:.3f}.")
                k = k_min
            rs = schedule(t0, layers, k + extra)
        options["schedule"] = rs
        return k

    def vision_forward(self, adapter, model, pixel_values, spec, plan: Plan):
        stem = adapter.vision_stem(model)
        x = stem.embed(pixel_values)  # [1, T0, Dv]
        t0 = x.shape[1]
        size = torch.ones(t0, 1, dtype=x.dtype)  # [T0, 1]
        token_map = torch.arange(t0)  # [T0]: current position of each original token
        for block, r in zip(stem.blocks, plan.options["schedule"]):
            x, size, new_pos = tome_block(block, x, size, int(r))
            token_map = new_pos[token_map]
        x, kept, token_map = order_groups(x, token_map)  # [CLS] is group 0
        if spec.has_cls:  # "full"
            return stem.project(x), kept[None], token_map[None]
        return stem.project(x[:, 1:]), (kept[1:] - 1)[None], (token_map[1:] - 1)[None]


METHOD = ToMe()
