"""`pool`: 2-D average pooling of the projected visual tokens over s x s windows of the patch grid.

The LLaVolta / "pooling" baseline. Tokens are row-major on a (rows, cols) grid; window s must divide
both, so K = (rows/s)(cols/s) (+1 when the [CLS] token is among the visual tokens: it is kept as is).
The window is chosen as the s whose K is nearest round(ratio*N); ties prefer more tokens.
ratio 0.25 on 24x24 -> s=2 -> 144 tokens. kept_index reports each window's top-left patch,
token_map the window every patch was averaged into.
"""

from __future__ import annotations

import torch

from vtc.export.methods.base import Method, Option, Plan, budget
from vtc.runtime.errors import MethodError


class Pool(Method):
    name = "pool"
    where = "after projector"
    summary = "Average-pool the projected tokens over s x s windows of the patch grid."
    paper = "LLaVolta (arXiv 2406.16635), pooling baseline"
    reference = "-"
    options = (Option("window", int, 0, "Window side s (0 = derive from --ratio); must divide the grid."),)

    def _k(self, spec, s: int) -> int:
        rows, cols = spec.grid
        return (rows // s) * (cols // s) + int(spec.has_cls)

    def feasible_k(self, spec, ratio, options) -> int:
        rows, cols = spec.grid
        windows = [s for s in range(1, min(rows, cols) + 1) if rows % s == 0 and cols % s == 0]
        if options["window"]:
            if options["window"] not in windows:
                raise MethodError(f"pool window {options['window']} does not divide the {rows}x{cols} patch grid.",
                                  f"Use one of {windows}.")
            return self._k(spec, options["window"])
        target = budget(ratio, spec.num_tokens)
        best = min(windows, key=lambda s: (abs(self._k(spec, s) - target), s))
        options["window"] = best
        return self._k(spec, best)

    def compress(self, feats, spec, plan: Plan):
        s = plan.options["window"]
        rows, cols = spec.grid
        x = feats.embeds  # [1, N, D]
        cls, patches = (x[:, :1], x[:, 1:]) if spec.has_cls else (None, x)
        d = patches.shape[-1]
        pooled = patches.reshape(1, rows // s, s, cols // s, s, d).mean(dim=(2, 4))  # [1, r/s, c/s, D]
        pooled = pooled.reshape(1, -1, d)
        r = torch.arange(rows // s, dtype=torch.int64) * s
        c = torch.arange(cols // s, dtype=torch.int64) * s
        kept = (r[:, None] * cols + c[None, :]).reshape(-1)  # top-left patch of each window
        pr, pc = torch.arange(rows, dtype=torch.int64) // s, torch.arange(cols, dtype=torch.int64) // s
        window = (pr[:, None] * (cols // s) + pc[None, :]).reshape(-1)  # [rows*cols]: each patch's window
        if cls is not None:
            zero = torch.zeros(1, dtype=torch.int64)
            return (torch.cat([cls, pooled], 1), torch.cat([zero, kept + 1])[None], torch.cat([zero, window + 1])[None])
        return pooled, kept[None], window[None]


METHOD = Pool()
