"""What every architecture adapter provides, and the loading rules they share.

Loading rules (all adapters): local directory only, safetensors only (pickled `*.bin` weights are
refused), `trust_remote_code=False`, float32 on CPU, eager attention (the reference math).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vtc.runtime.errors import ModelError
from vtc.runtime.manifest import LMInfo


@dataclass(frozen=True)
class VisualSpec:
    """The visual tokens an architecture hands to its language model, before compression."""

    num_tokens: int  # N: tokens the projector emits per image (576 for LLaVA-1.5 "default")
    grid: tuple[int, int]  # patch grid (rows, cols); the patch tokens are row-major
    has_cls: bool  # token 0 is the vision [CLS] token ("full" feature strategy)
    cls_attention: bool  # the encoder has a [CLS] token whose attention can rank patches
    embed_dim: int  # D: the language model's hidden size
    # hidden-state indices the projector reads (hidden_states[l] is the output of encoder layer l-1,
    # so l layers run); () = unknown. Methods inside the encoder (ToMe) plan their schedule from it.
    feature_layers: tuple[int, ...] = ()


# The LM's cache-sizing shapes: the same record the manifest stores (runtime.manifest.LMInfo).
LMSpec = LMInfo


@dataclass
class VisualFeatures:
    """What the vision side computes for one image; methods read what they need (computed lazily).

    embeds       [1, N, D]      projected visual tokens (what the LM sees uncompressed)
    states       [1, 1+Np, Dv]  feature-layer hidden states, [CLS] at 0 when the encoder has one
    block_input  [1, 1+Np, Dv]  input of the encoder block that produces the feature layer
    block        that block (layer_norm1, self_attn.{q,k,v}_proj, num_heads, head_dim, scale)
    project      the projector, [1, M, Dv] -> [1, M, D]
    """

    embeds: torch.Tensor
    states: torch.Tensor | None = None
    block_input: torch.Tensor | None = None
    block: nn.Module | None = None
    project: object = None
    _cls_attn: torch.Tensor | None = None

    @property
    def cls_attn(self) -> torch.Tensor:
        """[1, Np]: head-averaged softmax attention of [CLS] to the patches in `block`."""
        if self._cls_attn is None:
            probs = self.attention_probs(rows=slice(0, 1))  # [1, H, 1, 1+Np]
            self._cls_attn = probs[:, :, 0, 1:].mean(dim=1)
        return self._cls_attn

    def attention_probs(self, rows: slice = slice(None)) -> torch.Tensor:
        """[1, H, R, 1+Np] softmax(q k^T * scale) of `block` for the query rows `rows` (fp32)."""
        q, k = self.queries_keys()
        return torch.softmax(torch.matmul(q[:, :, rows], k.transpose(-1, -2)) * self.block.self_attn.scale,
                             dim=-1, dtype=torch.float32)

    def queries_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([1, H, 1+Np, Dh], [1, H, 1+Np, Dh]): `block`'s queries and keys, as its attention computes them."""
        attn = self.block.self_attn
        h = self.block.layer_norm1(self.block_input)
        shape = (1, h.shape[1], attn.num_heads, attn.head_dim)
        return (attn.q_proj(h).view(shape).transpose(1, 2), attn.k_proj(h).view(shape).transpose(1, 2))


def check_weights(checkpoint_dir: Path) -> None:
    """Refuse pickled weights; require safetensors."""
    if any(checkpoint_dir.glob("*.safetensors")):
        return
    if any(checkpoint_dir.glob("*.bin")) or any(checkpoint_dir.glob("*.pt")):
        raise ModelError(f"{checkpoint_dir} has only pickled weights (*.bin/*.pt); vtc never loads pickles.",
                         "Convert them to safetensors (e.g. `model.save_pretrained(dir, safe_serialization=True)` "
                         "in a trusted environment) and pass that directory.")
    raise ModelError(f"{checkpoint_dir} has no *.safetensors weights.",
                     "Pass a complete checkpoint directory (config.json + model*.safetensors).")


def load_hf(cls, checkpoint_dir: Path) -> nn.Module:
    """Load an HF model class from a local directory under the loading rules above."""
    check_weights(checkpoint_dir)
    try:
        model = cls.from_pretrained(checkpoint_dir, dtype=torch.float32, attn_implementation="eager",
                                    use_safetensors=True, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"could not load {checkpoint_dir} as {cls.__name__}: {e}",
                         "Check that the directory is a complete, uncorrupted checkpoint.") from e
    return model.eval()
