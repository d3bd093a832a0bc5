"""The language model over a runtime-owned static KV cache: the module the `llm.onnx` graph is traced from.

One graph serves prefill and decode (weights stored once, loaded once):

    inputs_embeds  [1, S, D]        float   S = prompt length at prefill, 1 at decode
    position_ids   [1, S]           int64   RoPE positions of the S new tokens ([3, 1, S] for M-RoPE: Qwen2-VL's
                                            decoders take (t, h, w) rows and apply mrope_section in their own
                                            rotary embedding; option `positions="mrope"`)
    past_lengths   [L]              int64   valid cache entries per layer (entries >= are masked)
    logits_index   [1]              int64   which of the S positions to return logits for
    past_key.i     [1, Hkv, P, Dh]  float   layer i's cache, P = 0 at prefill, max_seq_len at decode
    past_value.i   [1, Hkv, P, Dh]
  ->
    logits         [1, V]           float32
    present_key.i  [1, Hkv, S, Dh]  float   ONLY the new tokens' keys (post-RoPE); the runtime writes
    present_value.i[1, Hkv, S, Dh]          them into its buffer at past_lengths[i], never the whole cache

Attention is computed in two blocks, q·K_past^T and q·K_new^T, joined by one softmax, so the graph never
concatenates (copies) the cache. Grouped-query attention groups the queries by KV head instead of
repeating the cache (HF's `repeat_kv` would copy it).

The math of every sub-module (norms, projections, MLP, rotary embedding) is HF's own module, called as
is; only the cache handling is ours. Parity against HF `generate` is tested over many decode steps.

In-LLM compression methods (FastV, TokenCarve) split the model at a work layer W into two segments
with the same cache contract: `llm_pre` = layers [0, W) returns `hidden_states` [1, S, D] and
`last_attn` [1, S] (head-averaged attention of the last position over the S new keys in layer W-1)
instead of logits; `llm_post` = layers [W, L) takes `hidden_states` instead of `inputs_embeds`.
Each segment's `past_lengths` and `past_*` cover its own layers, numbered from its first layer.

Quantized KV cache (KVQuant): a layer's cache may be stored as float16, int8 or float8_e4m3fn with
static scales s_k, s_v [Hkv, Dh] (per channel; per head = constant along Dh). Only the NEW tokens are
quantized in the graph (x / s, round + clamp for int8, clamp to +-448 for fp8, Cast); the past is
only Cast to float, never rescaled per element: the key scale is folded into the query,
(q * s_k) . K_q^T, and the value scale into the attention output, (P . V_q) * s_v. The new block
attends to its own dequantized K/V, so a token sees the same keys at prefill and at every decode step.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0}
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8,
               "float8_e4m3fn": torch.float8_e4m3fn}


@dataclass(frozen=True)
class KVQuant:
    """Per-layer KV cache storage: dtype and, for int8/fp8, static scales [Hkv, Dh] (x = q * s)."""

    dtypes: tuple  # per layer: "float32" | "float16" | "int8" | "float8_e4m3fn"
    k_scale: tuple  # per layer: tensor [Hkv, Dh] or None
    v_scale: tuple

    @staticmethod
    def float32(num_layers: int) -> "KVQuant":
        return KVQuant(("float32",) * num_layers, (None,) * num_layers, (None,) * num_layers)


def quantize(x: torch.Tensor, scale, dtype: str) -> torch.Tensor:
    """Store x [1, Hkv, S, Dh] in `dtype`; scale [1, Hkv, 1, Dh] for int8/fp8."""
    if dtype == "int8":
        return torch.round(x / scale).clamp(-QMAX["int8"], QMAX["int8"]).to(torch.int8)
    if dtype == "float8_e4m3fn":
        return (x / scale).clamp(-QMAX[dtype], QMAX[dtype]).to(torch.float8_e4m3fn)
    return x.to(TORCH_DTYPE[dtype])


def rotary_fn(attn_module: nn.Module):
    """HF's `apply_rotary_pos_emb` from the modeling file that defines this attention class."""
    return sys.modules[type(attn_module).__module__].apply_rotary_pos_emb


def split_attention(q, k_new, v_new, k_past, v_past, past_len, scale: float, want_last_row: bool = False,
                    k_scale=None, v_scale=None):
    """Causal attention of S new queries over a masked static past plus the S new keys.

    q [1, H, S, Dh]; k_new, v_new [1, Hkv, S, Dh]; k_past, v_past [1, Hkv, P, Dh]; past_len [] int64.
    Returns ([1, S, H*Dh], last_row): last_row [1, S] is the head-averaged attention probability of
    the last query over the S new keys (None unless asked). Matches HF eager attention: fp32 softmax,
    scores * scale, masked = finfo.min. k_scale, v_scale [1, Hkv, 1, Dh]: the past is stored quantized
    (k_past = K / k_scale), folded into the query and the past's output instead of dequantizing it.
    """
    _, n_heads, seq, head_dim = q.shape
    n_kv = k_new.shape[1]
    group = n_heads // n_kv
    qg = q.reshape(1, n_kv, group * seq, head_dim)  # query head h = kv*group + g
    q_past = qg if k_scale is None else qg * k_scale
    # (K_past q^T)^T, not q K_past^T: the same dot products, but the P x Dh cache is read row by row
    # (ONNX Runtime's MatMul with a transposed B takes ~1.7x as long on a decode step's 1-row q).
    s_past = torch.matmul(k_past, q_past.transpose(-1, -2)).transpose(-1, -2) * scale  # [1, Hkv, G*S, P]
    s_new = torch.matmul(qg, k_new.transpose(-1, -2)) * scale  # [1, Hkv, G*S, S]
    neg = torch.finfo(s_new.dtype).min
    past_pos = torch.arange(k_past.shape[2], device=q.device)
    s_past = s_past.masked_fill(past_pos >= past_len, neg)
    pos = torch.arange(seq, device=q.device)
    causal = (pos[None, :] <= pos[:, None]).repeat(group, 1)  # [G*S, S] (query, key)
    s_new = s_new.masked_fill(~causal, neg)
    probs = torch.softmax(torch.cat([s_past, s_new], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    n_past = k_past.shape[2]
    out_past = torch.matmul(probs[..., :n_past], v_past)
    out = (out_past if v_scale is None else out_past * v_scale) + torch.matmul(probs[..., n_past:], v_new)
    out = out.reshape(1, n_heads, seq, head_dim).transpose(1, 2)  # [1, S, H, Dh]
    last_row = None
    if want_last_row:  # rows of query head (kv, g) at position s are at g*S + s
        rows = probs[..., n_past:].reshape(1, n_kv, group, seq, seq)[:, :, :, -1, :]  # [1, Hkv, G, S]
        last_row = rows.float().mean(dim=(1, 2))  # [1, S]
    return out.reshape(1, seq, n_heads * head_dim), last_row


class StaticCacheLM(nn.Module):
    """Llama-family decoder (Llama, Mistral, Qwen2 text) driven by a runtime-owned static cache.

    `decoder` is HF's base model (`.layers`, `.norm`, `.rotary_emb`), `lm_head` the output projection.
    `layers` = (first, end) selects a segment; the last segment ends with norm + lm_head, an earlier
    one returns its hidden states and the last position's attention row (see the module doc).
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Module, layers: tuple[int, int] | None = None,
                 kv: KVQuant | None = None, positions: str = "1d"):
        super().__init__()
        self.positions = positions  # "1d": position_ids [1, S]; "mrope": [3, 1, S] (vtc.runtime.positions)
        self.decoder = decoder
        self.lm_head = lm_head
        self.first, self.end = layers or (0, len(decoder.layers))
        self.kv = kv or KVQuant.float32(len(decoder.layers))
        self.has_head = self.end == len(decoder.layers)
        attn = decoder.layers[0].self_attn
        self.scale = float(attn.scaling)
        self.head_dim = int(attn.head_dim)
        self.apply_rope = rotary_fn(attn)

    @property
    def num_layers(self) -> int:
        """Layers in this segment."""
        return self.end - self.first

    def example_positions(self, seq: int) -> torch.Tensor:
        """Trace-time position_ids of `seq` tokens: [1, S], or [3, 1, S] for M-RoPE (the sequence is the last dim)."""
        pos = torch.arange(seq)[None]
        return pos[None].expand(3, 1, seq).contiguous() if self.positions == "mrope" else pos

    def layer(self, i, hidden, cos, sin, k_past, v_past, past_len, want_last_row=False):
        block = self.decoder.layers[i]
        attn = block.self_attn
        x = block.input_layernorm(hidden)  # [1, S, D]
        shape = (1, x.shape[1], -1, self.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)  # [1, H, S, Dh]
        k = attn.k_proj(x).view(shape).transpose(1, 2)  # [1, Hkv, S, Dh]
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        q, k = self.apply_rope(q, k, cos, sin)
        dtype, ks, vs = self.kv.dtypes[i], self.kv.k_scale[i], self.kv.v_scale[i]
        if TORCH_DTYPE[dtype] == q.dtype:  # the cache stores the graph's own dtype: no conversion
            a, last_row = split_attention(q, k, v, k_past, v_past, past_len, self.scale, want_last_row)
            return self._block_out(block, hidden, a), k, v, last_row
        ks = None if ks is None else ks.to(q.dtype)[None, :, None, :]  # [1, Hkv, 1, Dh]
        vs = None if vs is None else vs.to(q.dtype)[None, :, None, :]
        k_store, v_store = quantize(k, ks, dtype), quantize(v, vs, dtype)  # only the new tokens
        k_new = k_store.to(q.dtype) if ks is None else k_store.to(q.dtype) * ks
        v_new = v_store.to(q.dtype) if vs is None else v_store.to(q.dtype) * vs
        a, last_row = split_attention(q, k_new, v_new, k_past.to(q.dtype), v_past.to(q.dtype), past_len, self.scale,
                                      want_last_row, k_scale=ks, v_scale=vs)
        return self._block_out(block, hidden, a), k_store, v_store, last_row

    @staticmethod
    def _block_out(block, hidden, a):
        hidden = hidden + block.self_attn.o_proj(a)
        return hidden + block.mlp(block.post_attention_layernorm(hidden))

    def forward(self, hidden, position_ids, past_lengths, logits_index, past):
        """`hidden` is inputs_embeds (first segment) or hidden_states; `past` the flat tuple
        (past_key.0, past_value.0, past_key.1, ...) of this segment's layers. See the module doc."""
        cos, sin = self.decoder.rotary_emb(hidden, position_ids)
        presents, last_row = [], None
        for j in range(self.num_layers):
            want = not self.has_head and j == self.num_layers - 1
            hidden, k, v, row = self.layer(self.first + j, hidden, cos, sin, past[2 * j], past[2 * j + 1],
                                           past_lengths[j], want)
            last_row = row if want else last_row
            presents += [k, v]
        if not self.has_head:
            return (hidden, last_row, *presents)
        last = torch.index_select(hidden, 1, logits_index)  # [1, 1, D]
        logits = self.lm_head(self.decoder.norm(last)).float()  # [1, 1, V]
        return (logits.reshape(1, -1), *presents)
