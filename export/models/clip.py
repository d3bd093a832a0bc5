"""CLIP and SigLIP vision blocks (HF `CLIPEncoderLayer`, `SiglipEncoderLayer`) as vtc VisionBlocks.

Both name their parts alike: layer_norm1 -> self_attn (q/k/v/out_proj, num_heads, head_dim, scale)
-> residual -> layer_norm2 -> mlp -> residual. The math is HF's eager attention (fp32 softmax).
"""

from __future__ import annotations

import torch

from vtc.export.models.base import VisionBlock


class ClipBlock(VisionBlock):
    def __init__(self, layer):
        self.layer = layer
        attn = layer.self_attn
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale

    def qkv(self, x: torch.Tensor):
        h = self.layer.layer_norm1(x)
        attn = self.layer.self_attn
        shape = (1, h.shape[1], self.num_heads, self.head_dim)
        return tuple(p(h).view(shape).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))

    def attn_out(self, o: torch.Tensor) -> torch.Tensor:
        return self.layer.self_attn.out_proj(o)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer.mlp(self.layer.layer_norm2(x))
