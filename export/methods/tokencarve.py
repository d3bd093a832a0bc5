"""`tokencarve`: TokenCarve's two-stage IPGS inside the LLM at work layer W (default 2).

TokenCarve (arXiv 2503.10501; ShawnTan86/TokenCarve @ a57bd59, TokenCarve/modeling_llama.py,
LlamaModel.forward ~L1128-1256): from layer W-1 (the layer before the work layer) take the
head-averaged attention of the last prompt token to the image tokens and the layer's output hidden
states X. Stage 1: rank by attention and by the SVD information rank sum_k |U_ik S_k| (X = U S V^T),
Borda-combine with weight w (default 0.5), keep R = int(1.5 T) in score order. Stage 2: A = first
R/2, B = the rest; the min(R/2, int(T/2)) B tokens most cosine-similar to their best A partner are
merged into it (mean including the partner); T image tokens remain (for every T). Text tokens are
kept; kept tokens keep their ORIGINAL RoPE positions; the KV of layers < W is gathered with the same
kept positions, so every layer's cache holds the same L' tokens.

Export: ONNX has no SVD, so the LLM is split at W (llm_pre / llm_post) and the selection runs exactly,
in float64 numpy, in the runtime between the two (vtc.runtime.selectors.tokencarve). No in-graph
approximation is offered: fp32 eigh/power iteration do not reproduce the SVD ranking near the cut.
Cost: one SVD of an N x D matrix per prompt (measured by `make bench`), and a one-time gather of the
layers < W cache.
Ties (Borda scores are multiples of w): higher score first, then lower token index; applied in the
transcription test of the reference too.
"""

from __future__ import annotations

from vtc.export.methods.base import InLLMMethod, Option, budget
from vtc.runtime.errors import MethodError


class TokenCarve(InLLMMethod):
    name = "tokencarve"
    where = "LLM, at work layer W (default 2)"
    selector = "tokencarve"  # vtc.runtime.selectors: exact float64 IPGS in numpy; trims layers < W too
    requires = frozenset({"one_image_block"})  # the selector ranks one contiguous span of image tokens
    summary = "Attention + SVD ranks (Borda), keep 1.5T, merge similar down to T; layers < W trimmed too."
    paper = "TokenCarve, arXiv 2503.10501"
    reference = "github.com/ShawnTan86/TokenCarve @ a57bd59 (modeling_llama.py)"
    options = (Option("layer", int, 2, "W: the work layer (1 <= W < num_layers); scores come from layer W-1."),
               Option("weight", float, 0.5, "w: weight of the attention ranking (1-w: SVD ranking), 0..1."))

    def feasible_k(self, spec, ratio, options) -> int:
        if not 0.0 <= options["weight"] <= 1.0:
            raise MethodError(f"tokencarve weight={options['weight']} is outside 0..1.", "Pass --method-opt weight=0.5.")
        t = budget(ratio, spec.num_tokens)
        if int(1.5 * t) > spec.num_tokens:
            limit = spec.num_tokens * 2 // 3
            raise MethodError(f"tokencarve keeps 1.5*T image tokens before merging; T={t} needs {int(1.5 * t)} of "
                              f"{spec.num_tokens}.", f"Use --ratio {limit / spec.num_tokens:.3f} or lower (T <= {limit}).")
        return t


METHOD = TokenCarve()
