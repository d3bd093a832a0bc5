"""`fastv`: prune visual tokens once at prefill, inside the LLM, by the last token's attention.

FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764; reference
pkunlp-icler/FastV @ d165972, src/FastV/lmms-eval/fastv_kvcache.py, FastVLlamaModel.forward):
at prefill, score each image token by the head-averaged attention the LAST prompt token pays it in
layer K-1 (`last_attention.mean(dim=1)[0][-1][image span]`), keep the top R image tokens
(`topk(R).indices`), keep every text token, sort, and run layers K.. on the kept hidden states with
their ORIGINAL position ids (`position_ids = keep_indexs`). "Static KV pruning": layers < K keep the
full prompt in their KV cache, layers >= K only the kept tokens; decode attends to that fixed set and
continues the original position numbering. Default K = 2 (the paper's setting; the reference file
hard-codes K=3), kept image tokens R = round(ratio * N).

Export: the LLM is split at K (llm_pre = layers [0, K), llm_post = [K, L)); the selection is the small
static-shape graph `select.onnx` traced from `select`: TopK over a priority that is 2.0 for text
tokens (always kept) and the attention for image tokens, k = S - (N - R) derived from the input shape,
then sorted indices (TopK ties: lower index first, as ONNX TopK specifies) and a Gather.
"""

from __future__ import annotations

import torch

from torch import nn

from vtc.export.methods.base import InLLMMethod, Option, Plan


class FastV(InLLMMethod):
    name = "fastv"
    where = "LLM, before layer K (default 2)"
    selector = "fastv"  # vtc.runtime.selectors: runs select.onnx, reports the kept image tokens
    requires = frozenset({"one_image_block"})  # the selector ranks one contiguous span of image tokens
    summary = "Keep the image tokens the last prompt token attends to most in layer K-1; layers < K keep the full KV."
    paper = "FastV, arXiv 2403.06764"
    reference = "github.com/pkunlp-icler/FastV @ d165972 (fastv_kvcache.py)"
    options = (Option("layer", int, 2, "K: prune before this LLM layer (1 <= K < num_layers)."),)

    def extra_graphs(self, plan: Plan, hidden: int, dtype=None) -> dict:
        from vtc.export.onnx_export import ExportSelect

        return {"select": ExportSelect(SelectGraph(self, plan.n, plan.k), hidden, *(() if dtype is None else (dtype,)))}

    def reference_graphs(self, plan: Plan) -> dict:
        from vtc.export.onnx_export import EagerGraph

        return {"select": EagerGraph(SelectGraph(self, plan.n, plan.k), ("hidden_states", "last_attn", "image_start"))}

    def select(self, hidden, last_attn, image_start, n: int, k: int):
        """hidden [1, S, D], last_attn [1, S], image_start [1] int64 ->
        (hidden [1, S', D], keep [1, S'] int64 original positions), S' = S - (n - k)."""
        seq = hidden.shape[1]
        pos = torch.arange(seq, dtype=torch.int64)
        is_image = (pos >= image_start) & (pos < image_start + n)  # [S]
        priority = torch.where(is_image, last_attn[0], torch.full_like(last_attn[0], 2.0))
        keep = torch.topk(priority, seq - (n - k), sorted=True).indices
        keep = torch.sort(keep).values
        return torch.index_select(hidden, 1, keep), keep[None]


class SelectGraph(nn.Module):
    """select.onnx: hidden_states [1, S, D], last_attn [1, S], image_start [1] ->
    (kept_hidden_states [1, S', D], keep_index [1, S'])."""

    def __init__(self, method: FastV, n: int, k: int):
        super().__init__()
        self.method, self.n, self.k = method, n, k

    def forward(self, hidden_states, last_attn, image_start):
        return self.method.select(hidden_states, last_attn, image_start, self.n, self.k)


METHOD = FastV()
