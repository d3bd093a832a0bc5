"""The interface every compression method implements, and the budget rule they share.

Budget: K = max(1, round(ratio * N)). A method with a structural constraint (pooling needs a grid
factor) picks the nearest feasible K and the plan records the K it used.
Every method produces exactly K tokens (static shapes) and returns the kept token indices in
original order, [1, K] int64, which the runtime reports (`run --json`).
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

    def compress(self, feats: VisualFeatures, spec: VisualSpec, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds [1, K, D], kept_index [1, K] int64). Traced into the vision graph."""
        raise NotImplementedError


def gather_sorted(embeds: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep `index` [K] rows of embeds [1, N, D] in original order: (embeds [1, K, D], index [1, K])."""
    index = torch.sort(index).values
    return torch.index_select(embeds, 1, index), index[None]
