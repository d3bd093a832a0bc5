"""`uniform`: keep K tokens evenly spaced over the patch tokens (stride sampling baseline).

Index formula, over the M patch tokens in row-major order (M = rows * cols), choosing k of them:
  idx_i = floor((i + 0.5) * M / k) = ((2i + 1) * M) // (2k),   i = 0 .. k-1
the centre of each of k equal slices of [0, M): strictly increasing (M / k >= 1), in [0, M-1],
consecutive picks differ by floor or ceil of M / k. 576 tokens, K = 144: idx = 4i + 2 (columns 2, 6, ...,
22 of every row of the 24 x 24 grid). The stride is over the flattened (row-major) order, not a 2-D
lattice. The index set depends only on (N, K): it is a constant in the graph, the same for every image.

[CLS]: with the "full" feature strategy token 0 is the vision [CLS]; like `cls-attn` and `pool` it is
always kept, and the k = K - 1 others are strided over the patches (K >= 2 then). Otherwise k = K.
No paper of its own: the stride / uniform-sampling baseline of the token-pruning literature.
"""

from __future__ import annotations

import torch

from vtc.export.methods.base import Method, Plan, gather_sorted


def stride_indices(m: int, k: int) -> list[int]:
    """k evenly spaced indices of range(m): floor((i + 0.5) * m / k), exact in integers."""
    return [((2 * i + 1) * m) // (2 * k) for i in range(k)]


def with_cls(patch_index: list[int], has_cls: bool) -> list[int]:
    """Token indices: patch indices shifted past [CLS], with [CLS] (0) first, when it is a visual token."""
    return [0] + [j + 1 for j in patch_index] if has_cls else list(patch_index)


class Uniform(Method):
    name = "uniform"
    where = "after projector"
    summary = ("Keep K tokens evenly spaced over the patches: floor((i + 0.5) * N / K); "
               "[CLS] always kept when it is a visual token.")
    paper = "stride-sampling baseline"
    reference = "-"

    def feasible_k(self, spec, ratio, options) -> int:
        k = super().feasible_k(spec, ratio, options)
        return max(k, 2) if spec.has_cls else k

    def indices(self, spec, plan: Plan) -> list[int]:
        m = spec.num_tokens - int(spec.has_cls)
        return with_cls(stride_indices(m, plan.k - int(spec.has_cls)), spec.has_cls)

    def compress(self, feats, spec, plan: Plan):
        index = torch.tensor(self.indices(spec, plan), dtype=torch.int64)  # [K] constant
        return gather_sorted(feats.embeds, index)  # ([1, K, D], [1, K], [1, N])


METHOD = Uniform()
