"""`vtc-export verify`: rebuild the PyTorch reference from the source checkpoint and re-check an artifact."""

from __future__ import annotations

import contextlib
from pathlib import Path

from vtc.runtime.errors import ModelError


def verify(artifact_dir: Path, tokens: int = 32, model_dir: str | None = None, step=None) -> dict:
    """Checksums first (a tampered file fails here), then per-graph and greedy-token parity."""
    from vtc.export import methods, models, parity
    from vtc.export.methods.base import Plan
    from vtc.runtime import manifest as mf
    from vtc.runtime.pipeline import VLM

    step = step or (lambda _label: contextlib.nullcontext())
    with step("checking manifest and file checksums"):
        m = mf.load(artifact_dir, check_files="hashes")
    src = Path(model_dir) if model_dir else Path(m.model.source)
    if not src.is_dir():
        raise ModelError(f"the source checkpoint {src} recorded in the manifest is not there.",
                         "Pass --model DIR with the checkpoint the artifact was built from.")
    with step("loading the source checkpoint in PyTorch"):
        adapter = models.resolve(src).with_image_splits(m.build_args.get("image_splits"))  # the built image layout
        model = adapter.load(src)
    spec = adapter.visual_spec(model)
    if spec.num_tokens != m.compression.n_visual:
        raise ModelError(f"{src} gives {spec.num_tokens} visual tokens; the artifact was built for "
                         f"{m.compression.n_visual}.", "Pass --model with the checkpoint the artifact was built from.")
    method = methods.get(m.compression.method)  # a registered method, built-in or plugin
    plan = Plan(method=m.compression.method, ratio=m.compression.ratio, n=m.compression.n_visual,
                k=m.compression.k_visual, options=dict(m.compression.options))
    with step(f"comparing graphs and {tokens} greedy tokens against PyTorch"):
        vlm = VLM(artifact_dir, check_files=False)
        return parity.check(artifact_dir, adapter, model, method, plan, spec, max_new_tokens=tokens, vlm=vlm)
