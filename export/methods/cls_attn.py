"""`cls-attn`: keep the K patches the vision [CLS] token attends to most (FasterVLM-style).

Score of patch j = softmax(q_cls k^T / sqrt(d)) at the vision feature layer, averaged over heads
(FasterVLM, arXiv 2412.01818, `attentions[select_layer][:, :, 0, 1:].mean(1)`). Keep the top K
(TopK; ties go to the lower index, ONNX TopK's rule), in original order. With the "full" feature
strategy the [CLS] token itself is a visual token: it is always kept, and K-1 patches are chosen.
"""

from __future__ import annotations

import torch

from vtc.export.methods.base import Method, Plan, gather_sorted


class ClsAttention(Method):
    name = "cls-attn"
    where = "vision encoder (feature layer)"
    requires = frozenset({"cls_token"})
    summary = "Keep the K patches with the highest head-averaged [CLS] attention."
    paper = "FasterVLM, arXiv 2412.01818"
    reference = "github.com/Theia-4869/FasterVLM"

    def feasible_k(self, spec, ratio, options) -> int:
        k = super().feasible_k(spec, ratio, options)
        return max(k, 2) if spec.has_cls else k

    def compress(self, feats, spec, plan: Plan):
        scores = feats.cls_attn[0]  # [N_patches]
        n_pick = plan.k - int(spec.has_cls)
        top = torch.topk(scores, n_pick, sorted=True).indices
        if spec.has_cls:
            top = torch.cat([torch.zeros(1, dtype=top.dtype), top + 1])
        return gather_sorted(feats.embeds, top)


METHOD = ClsAttention()
