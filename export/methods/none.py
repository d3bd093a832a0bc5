"""`none`: keep every visual token (what `--ratio 1.0` means for any method)."""

from __future__ import annotations

import torch

from vtc.export.methods.base import Method, Plan


class NoCompression(Method):
    name = "none"
    where = "-"
    summary = "Keep all N visual tokens (the uncompressed model)."
    compresses = False

    def feasible_k(self, spec, ratio, options) -> int:
        return spec.num_tokens

    def compress(self, feats, spec, plan: Plan):
        index = torch.arange(feats.embeds.shape[1], dtype=torch.int64)[None]
        return feats.embeds, index, index


METHOD = NoCompression()
