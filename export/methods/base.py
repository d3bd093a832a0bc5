"""The interface every compression method implements, and the budget rule they share.

Budget: K = max(1, round(ratio * N)). A method with a structural constraint (pooling needs a grid
factor) picks the nearest feasible K and the plan records the K it used.
Every method produces exactly K tokens (static shapes) and returns, besides the embeddings:
  kept_index [1, K] int64: the original token each output token stands for (its representative),
  token_map  [1, N] int64: the output token each original token went into, -1 if it was dropped
(merging methods map several originals to one output). The runtime reports both (`run --json`).

The contract a method declares (checked before any export; nothing outside a method's own module
names it):
  stage      "vision": compressed inside vision.onnx; "llm": pruned inside the LLM at a work layer
  requires   what it needs from the architecture's vision side (VisualSpec.capabilities), e.g.
             {"cls_token"}: a model without one is refused with the list of methods that apply
  options    typed `--method-opt` options
  selector   (stage "llm") the runtime selection it runs between the LLM segments, by name
             (vtc.runtime.selectors); recorded in the manifest. `extra_graphs` adds the graphs that
             selection needs (FastV: select.onnx), `reference_graphs` their eager PyTorch stand-ins.
Where a vision-stage method operates decides which hook it implements:
  after the projector / at the feature layer: `compress(feats, spec, plan)` on VisualFeatures;
  inside the encoder (ToMe): override `vision_forward`, which by default runs the adapter's
  encoder and then `compress`.
The eager PyTorch path of every method (the reference the artifact is checked against) is the same
code: `vision_forward`/`compress` run eagerly, and in-LLM selections run the runtime's selector.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from vtc.export.models.base import CAPABILITIES, VisualFeatures, VisualSpec
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
    requires: frozenset = frozenset()  # VisualSpec.capabilities it needs
    compresses: bool = True  # False only for `none` (the uncompressed model)
    selector: str | None = None  # stage "llm": vtc.runtime.selectors name
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

    def applies_to(self, spec: VisualSpec) -> bool:
        return self.requires <= spec.capabilities

    def plan(self, spec: VisualSpec, ratio: float, raw_options: dict[str, str]) -> Plan:
        missing = sorted(self.requires - spec.capabilities)
        if missing:
            from vtc.export import methods

            need = "; ".join(CAPABILITIES.get(m, m) for m in missing)
            ok = ", ".join(m.name for m in methods.all_methods() if m.compresses and m.applies_to(spec))
            raise MethodError(f"method {self.name!r} does not apply to this model: it needs {need}, which this "
                              "vision encoder does not have.", f"Methods that apply to it: {ok}.")
        options = self.parse_options(raw_options)
        k = self.feasible_k(spec.per_image, ratio, options) * spec.images  # several images: a static K per image
        return Plan(method=self.name, ratio=ratio, n=spec.num_tokens, k=k, options=options)

    def feasible_k(self, spec: VisualSpec, ratio: float, options: dict) -> int:
        return budget(ratio, spec.num_tokens)

    def check_lm(self, num_layers: int, plan: Plan) -> None:
        """LLM-stage methods check their work layer against the language model; others need nothing."""

    # -- where the tokens go (the manifest's compression record) -----------------------------------
    def work_layer(self, plan: Plan) -> int | None:
        """W for stage "llm" (llm_pre = layers [0, W), llm_post = [W, L)); None for vision methods."""
        return None

    def kv_visual_per_layer(self, plan: Plan, num_layers: int) -> list[int]:
        """Visual tokens each layer's KV cache holds after prefill."""
        return [plan.k] * num_layers

    # -- the vision stage --------------------------------------------------------------------------
    def vision_forward(self, adapter, model, pixel_values: torch.Tensor, spec: VisualSpec, plan: Plan):
        """pixel_values [1, 3, H, W] -> (embeds [1, K, D], kept_index [1, K], token_map [1, N]).

        Traced into the vision graph; also the project's eager PyTorch path for this method."""
        return compress_images(self, adapter.visual_features(model, pixel_values), spec, plan)

    def compress(self, feats: VisualFeatures, spec: VisualSpec, plan: Plan):
        """(embeds [1, K, D], kept_index [1, K] int64, token_map [1, N] int64)."""
        raise NotImplementedError(f"method {self.name!r} implements neither compress nor vision_forward")

    # -- the llm stage -----------------------------------------------------------------------------
    def extra_graphs(self, plan: Plan, hidden: int, dtype: torch.dtype = torch.float32) -> dict:
        """Graphs besides vision/llm_pre/llm_post that the runtime selector needs: name -> a
        vtc.export.onnx_export loader (called with the output path, returns the GraphSpec); `hidden`
        and `dtype`: the LLM's hidden size and activation dtype."""
        return {}

    def reference_graphs(self, plan: Plan) -> dict:
        """Eager stand-ins of `extra_graphs` (objects with `run(feeds) -> [outputs]`, like a runtime session)."""
        return {}


class InLLMMethod(Method):
    """A method that prunes inside the LLM at a work layer (option `layer`), through a runtime selector."""

    stage = "llm"
    reads_prompt = True

    def check_lm(self, num_layers: int, plan: Plan) -> None:
        w = plan.options["layer"]
        if not 1 <= w < num_layers:
            raise MethodError(f"{self.name} layer={w} is outside this model's 1..{num_layers - 1}.",
                              f"Pass --method-opt layer=N with 1 <= N < {num_layers}.")

    def work_layer(self, plan: Plan) -> int | None:
        return plan.options["layer"]

    @property
    def trims_pre_kv(self) -> bool:
        """Whether layers < W keep only the kept tokens too: the runtime selector's declaration."""
        from vtc.runtime import selectors

        return selectors.get(self.selector).trims_pre_kv

    def kv_visual_per_layer(self, plan: Plan, num_layers: int) -> list[int]:
        if self.trims_pre_kv:
            return [plan.k] * num_layers
        w = self.work_layer(plan)
        return [plan.n] * w + [plan.k] * (num_layers - w)

    def run_selector(self, hidden, last_attn, image_start: int, plan: Plan):
        """The deployed selection, eagerly: hidden [S, D], last_attn [S] (numpy) -> selectors.Selection."""
        from vtc.runtime import selectors

        return selectors.get(self.selector)(hidden, last_attn, image_start, plan.n, plan.k, plan.options,
                                            self.reference_graphs(plan))


def compress_images(method: Method, feats: VisualFeatures, spec: VisualSpec, plan: Plan):
    """`method.compress` on each image's block of visual tokens, joined: (embeds [1, K, D], kept_index [1, K],
    token_map [1, N]) in token order over all images.

    One image: `compress` as is. B images (tiles + global; feats.embeds [B, n, D]): each is compressed alone
    to k = K / B with the one-image spec and plan (a static per-image quota, as TensorRT Edge-LLM's DART budgets
    per image), its kept indices offset by b * n and its token map by b * k."""
    if spec.images == 1:
        return method.compress(feats, spec, plan)
    one, b = spec.per_image, spec.images
    sub = Plan(method=plan.method, ratio=plan.ratio, n=one.num_tokens, k=plan.k // b, options=plan.options)
    parts = [method.compress(VisualFeatures(embeds=feats.embeds[i:i + 1]), one, sub) for i in range(b)]
    kept = [p[1] + i * sub.n for i, p in enumerate(parts)]
    maps = [torch.where(p[2] >= 0, p[2] + i * sub.k, p[2]) for i, p in enumerate(parts)]
    return torch.cat([p[0] for p in parts], 1), torch.cat(kept, 1), torch.cat(maps, 1)


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
