"""The interface every compression method implements, and the budget rule they share.

Budget: K = max(1, round(ratio * N)). A method with a structural constraint (pooling needs a grid
factor) picks the nearest feasible K and the plan records the K it used.
Every method produces exactly K tokens (static shapes) and returns, besides the embeddings:
  kept_index [1, K] int64: the original token each output token stands for (its representative),
  token_map  [1, N] int64: the output token each original token went into, -1 if it was dropped
(merging methods map several originals to one output). The runtime reports both (`run --json`).

Where a method operates decides which hook it implements:
  after the projector / at the feature layer: `compress(feats, spec, plan)` on VisualFeatures;
  inside the encoder (ToMe): override `vision_forward`, which by default runs the adapter's
  encoder and then `compress`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vtc.export.models.base import VisualFeatures, VisualSpec
from vtc.runtime.errors import MethodError


@dataclass(frozen=True)
class Option:
    """A documented per-method option (`--method-opt name=value`)."""

    name: str
    type: type
    default: Any
    help: str


@dataclass(frozen=True)
class Plan:
    """A method resolved against a model: what gets exported, recorded in the manifest."""

    method: str
    ratio: float
    n: int  # visual tokens before compression
    k: int  # visual tokens kept (the static budget actually used)
    options: dict = field(default_factory=dict)


def budget(ratio: float, n: int) -> int:
    """K = max(1, round(ratio * N)), the project-wide budget rule."""
    return max(1, min(n, round(ratio * n)))


class Method:
    """Base class: subclasses set the class attributes and implement `feasible_k` and `compress`."""

    name: str = ""
    stage: str = "vision"  # "vision": in the vision graph; "llm": inside the LLM at a work layer
    where: str = ""  # where it operates, e.g. "after projector"
    reads_prompt: bool = False
    needs_cls_attention: bool = False
    paper: str = ""
    reference: str = ""
    summary: str = ""
    options: tuple[Option, ...] = ()

    def parse_options(self, raw: dict[str, str]) -> dict:
        """Typed options with defaults; unknown names are errors listing the valid ones."""
        known = {o.name: o for o in self.options}
        for key in raw:
            if key not in known:
                valid = ", ".join(known) or "none"
                raise MethodError(f"method {self.name!r} has no option {key!r}.", f"Its options: {valid}.")
        out = {}
        for o in self.options:
            if o.name not in raw:
                out[o.name] = o.default
                continue
            try:
                out[o.name] = o.type(raw[o.name])
            except ValueError as e:
                raise MethodError(f"option {o.name}={raw[o.name]!r} of method {self.name!r} is not a "
                                  f"{o.type.__name__}.", o.help) from e
        return out

    def plan(self, spec: VisualSpec, ratio: float, raw_options: dict[str, str]) -> Plan:
        if self.needs_cls_attention and not spec.cls_attention:
            raise MethodError(f"method {self.name!r} ranks patches by [CLS] attention, but this vision "
                              "encoder has no [CLS] token.", "Choose a method that does not need one "
                              "(`vtc-export list`), e.g. pool.")
        options = self.parse_options(raw_options)
        k = self.feasible_k(spec, ratio, options)
        return Plan(method=self.name, ratio=ratio, n=spec.num_tokens, k=k, options=options)

    def feasible_k(self, spec: VisualSpec, ratio: float, options: dict) -> int:
        return budget(ratio, spec.num_tokens)

    def check_lm(self, num_layers: int, plan: Plan) -> None:
        """LLM-stage methods check their work layer against the language model; others need nothing."""

    def vision_forward(self, adapter, model, pixel_values: torch.Tensor, spec: VisualSpec, plan: Plan):
        """pixel_values [1, 3, H, W] -> (embeds [1, K, D], kept_index [1, K], token_map [1, N]).

        Traced into the vision graph; also the project's eager PyTorch path for this method."""
        return self.compress(adapter.visual_features(model, pixel_values), spec, plan)

    def compress(self, feats: VisualFeatures, spec: VisualSpec, plan: Plan):
        """(embeds [1, K, D], kept_index [1, K] int64, token_map [1, N] int64)."""
        raise NotImplementedError(f"method {self.name!r} implements neither compress nor vision_forward")


def token_map_of(index: torch.Tensor, n: int) -> torch.Tensor:
    """token_map [1, N] for a selection `index` [K] (sorted): position in `index`, or -1.

    One-hot comparison instead of a scatter (static shapes, no ScatterElements in the graph)."""
    hit = torch.arange(n, dtype=torch.int64)[:, None] == index[None, :]  # [N, K]
    slot = (hit.to(torch.int64) * torch.arange(index.shape[0], dtype=torch.int64)[None, :]).sum(dim=1)
    return torch.where(hit.any(dim=1), slot, torch.full_like(slot, -1))[None]


def gather_sorted(embeds: torch.Tensor, index: torch.Tensor):
    """Keep rows `index` [K] of embeds [1, N, D] in original order:
    (embeds [1, K, D], kept_index [1, K], token_map [1, N])."""
    index = torch.sort(index).values
    return torch.index_select(embeds, 1, index), index[None], token_map_of(index, embeds.shape[1])
