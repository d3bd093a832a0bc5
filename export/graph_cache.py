"""Reuse exported graphs between the builds of a sweep (`Cached`, passed to the build as `cache`).

Why: the LLM graph does not depend on the compression budget. `llm.onnx` has symbolic `seq` and
`past_seq` dims (K only changes the prefill profile range, which lives in the manifest, not in the
file), so every vision-side variant of one checkpoint exports the same graph; in-LLM variants at one
work layer export the same `llm_pre`/`llm_post` segments; and in-LLM variants all export the
uncompressed vision graph. Tracing the LLM is about 40% of a demo build.

How: `Cached(loader, cache_dir)` wraps an export loader (vtc.export.onnx_export.GraphLoader) and first
looks in the cache, keyed by everything the traced file depends on (the loader's `cache_key`: (a sha256 of the
segment's weights and buffers, its layers and head, KV heads and width, KV storage dtypes and scales,
torch and vtc versions; the uncompressed vision graph: the checkpoint's files, by path, size and mtime)). A hit hard-links the cached files into the build directory (a copy where links are not
possible) and reads the graph spec back from them; a miss exports as usual and links the result into
the cache. The build itself is unchanged: the manifest's checksums are computed from the linked files
(identical bytes), and parity against PyTorch still checks every artifact. Anything the key cannot
be computed for is exported normally.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

DONE = ".complete"


def _model_identity(model) -> dict | None:
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not path:
        return None
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        return None
    return {"path": str(Path(path).resolve()),
            "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def _versions() -> dict:
    import torch

    import vtc.export as pkg
    from vtc.export.onnx_export import EXPORT_REVISION

    return {"torch": torch.__version__, "vtc": getattr(pkg, "__version__", "?"), "export": EXPORT_REVISION}


def _digest(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _tensors_digest(module) -> str:
    """sha256 over a module's state (names, shapes, dtypes, bytes): the weights the graph bakes in."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def llm_key(lm, num_kv_heads: int, hidden: int, filename: str) -> str | None:
    """Cache key of an LLM segment export, or None if its inputs cannot be identified."""
    try:
        kv = lm.kv
        scales = [None if s is None else _tensors_digest_of(s) for s in (*kv.k_scale, *kv.v_scale)]
        parts = {"graph": "llm", "file": filename, "first": lm.first, "end": lm.end, "head": lm.has_head,
                 "kv_heads": num_kv_heads, "hidden": hidden, "dtypes": list(kv.dtypes), "scales": scales}
    except AttributeError:
        return None
    return _digest({**parts, "weights": _tensors_digest(lm), **_versions()})


def _tensors_digest_of(t) -> str:
    import torch

    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def vision_key(graph, image_size: int, filename: str) -> str | None:
    """Only the uncompressed vision graph is shared (in-LLM methods all export it)."""
    if graph.method.compresses:
        return None
    ident = _model_identity(graph.model)
    if ident is None:
        return None
    return _digest({"graph": "vision-none", "file": filename, "size": image_size, "model": ident, **_versions()})


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: copy
        shutil.copy2(src, dst)


def _outputs(path: Path) -> list[Path]:
    """The export's files: the graph and its external data (`<name>.data`)."""
    return sorted(p for p in path.parent.iterdir() if p.name == path.name or p.name == path.name + ".data")


class Cached:
    """A loader wrapper: link a cached export into place, or export and add it to the cache."""

    def __init__(self, loader, cache: Path):
        self.loader, self.cache = loader, Path(cache)
        self.label = loader.label

    def __call__(self, path: Path):
        from vtc.export.onnx_export import graph_spec

        path = Path(path)
        key = self.loader.cache_key(path.name)
        if key is None:
            return self.loader(path)
        entry = self.cache / key
        if (entry / DONE).is_file():
            for f in sorted(entry.iterdir()):
                if f.name != DONE:
                    _link(f, path.parent / f.name)
            return graph_spec(path, self.loader.profiles)
        spec = self.loader(path)
        self._store(entry, key, path)
        return spec

    def _store(self, entry: Path, key: str, path: Path) -> None:
        self.cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.cache))
        try:
            for f in _outputs(path):
                _link(f, tmp / f.name)
            (tmp / DONE).write_text("")
            if entry.exists():  # filled meanwhile by another build
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
