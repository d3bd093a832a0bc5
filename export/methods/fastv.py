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

from vtc.export.methods.base import Method, Option, Plan
from vtc.runtime.errors import MethodError


class FastV(Method):
    name = "fastv"
    stage = "llm"
    where = "LLM, before layer K (default 2)"
    reads_prompt = True
    summary = "Keep the image tokens the last prompt token attends to most in layer K-1; layers < K keep the full KV."
    paper = "FastV, arXiv 2403.06764"
    reference = "github.com/pkunlp-icler/FastV @ d165972 (fastv_kvcache.py)"
    options = (Option("layer", int, 2, "K: prune before this LLM layer (1 <= K < num_layers)."),)
    trims_pre_kv = False  # layers < K keep the full prompt

    def check_lm(self, num_layers: int, plan: Plan) -> None:
        k = plan.options["layer"]
        if not 1 <= k < num_layers:
            raise MethodError(f"fastv layer={k} is outside this model's 1..{num_layers - 1}.",
                              f"Pass --method-opt layer=N with 1 <= N < {num_layers}.")

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


METHOD = FastV()
