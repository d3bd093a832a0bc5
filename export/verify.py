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
    m = mf.load(artifact_dir, check_files="sizes")  # the source to check against, and whether it fits, first
    src = Path(model_dir) if model_dir else Path(m.model.source)
    if not src.is_dir():
        raise ModelError(f"the source checkpoint {src} recorded in the manifest is not there.",
                         "Pass --model DIR with the checkpoint the artifact was built from.")
    _check_memory(src)
    with step("checking manifest and file checksums"):
        m = mf.load(artifact_dir, check_files="hashes")
    with step("loading the source checkpoint in PyTorch"):
        adapter = (models.resolve(src).with_image_splits(m.build_args.get("image_splits"))  # the built image layout
                   .with_image_size(m.build_args.get("image_size")))
        model = adapter.load(src)
    spec = adapter.visual_spec(model)
    if spec.num_tokens != m.compression.n_visual:
        raise ModelError(f"{src} gives {spec.num_tokens} visual tokens; the artifact was built for "
                         f"{m.compression.n_visual}.", "Pass --model with the checkpoint the artifact was built from.")
    method = methods.get(m.compression.method)  # a registered method, built-in or plugin
    plan = Plan(method=m.compression.method, ratio=m.compression.ratio, n=m.compression.n_visual,
                k=m.compression.k_visual, options=dict(m.compression.options))
    backend = None
    if m.weights is not None:  # held to HF on exactly the weights the graphs store, as the build was
        backend = _quantized_reference(m, adapter, model)
    with step(f"comparing graphs and {tokens} greedy tokens against PyTorch"):
        vlm = VLM(artifact_dir, check_files=False, backend=backend)
        return parity.check(artifact_dir, adapter, model, method, plan, spec, max_new_tokens=tokens, vlm=vlm)


def _quantized_reference(m, adapter, model):
    """Quantize the float32 reference's LLM weights as the artifact stores them (vtc.export.wquant.fake_quantize)
    and return the backend the build checked it on (MatMulNBits at accuracy level 1)."""
    from types import SimpleNamespace

    from vtc.export import wquant
    from vtc.runtime.backend import OrtBackend

    w = m.weights
    if w.algo != "rtn":
        raise ModelError(f"this artifact's {w.dtype} weights were AWQ-scaled at build time; the source checkpoint "
                         "does not hold those scales, so verify cannot rebuild the reference.",
                         "Rely on the build's parity report (`vtc-export inspect`), or rebuild with --weights-algo rtn "
                         "to verify against the checkpoint.")
    args = SimpleNamespace(weights=w.dtype, group_size=w.group_size, weights_algo=w.algo)
    wquant.fake_quantize(SimpleNamespace(args=args, model=model, adapter=adapter))
    return OrtBackend(matmul_accuracy_level=1)


# verify holds the float32 PyTorch model (4 bytes per parameter) and ONNX Runtime's float32 sessions (~5 bytes
# per parameter of the LLM; vtc.export.build.ORT_BYTES_PER_PARAM) at once.
VERIFY_BYTES_PER_PARAM = 9


def _check_memory(src: Path) -> None:
    """Refuse, before loading anything, a full check this host cannot hold (a 7B model needs ~63 GB): the
    build's parity probe (manifest `parity.scope`) is what was checked there."""
    import json

    from vtc.export.build import _available_bytes
    from vtc.export.models.base import check_weights

    check_weights(src)
    params = 0
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, t in header.items():
            if name != "__metadata__":
                n = 1
                for d in t["shape"]:
                    n *= d
                params += n
    need, have = params * VERIFY_BYTES_PER_PARAM, _available_bytes()
    if need > have:
        raise ModelError(f"verifying against float32 PyTorch needs about {need / 2**30:.1f} GiB for this model's "
                         f"{params / 1e9:.2f} B parameters; this host has {have / 2**30:.1f} GiB available.",
                         "Run `vtc-export verify` on a host with that much memory; the build's own check (its "
                         "scope is in the manifest's parity.scope, `vtc-export inspect`) passed on this one.")

