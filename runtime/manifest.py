"""`manifest.json`: the versioned contract between the exporter and the runtime.

Written last by the build (after parity passed), parsed strictly here: unknown keys, missing keys,
wrong types and a schema version other than SCHEMA_VERSION are errors, and every field the runtime reads
is checked against its bounds and the other fields before use (vtc.runtime.artifact_check.validate).
`files` holds the sha256 and size of every other file in the artifact; `load(dir, check_files=...)`
checks them: "sizes" (default: confinement, presence, exact sizes, small files hashed, graph I/O),
"hashes" (every sha256: `verify`, `inspect --verify-hashes`) or False (the caller checked already).
The schema is documented in docs/DESIGN.md; bump SCHEMA_VERSION on any incompatible change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtc.runtime.errors import ArtifactError

SCHEMA = "vtc.artifact"
SCHEMA_VERSION = 3  # 3: compression.selector, lm.rope, text.tokenizer_as_is (architecture/method facts the
#                      runtime used to infer from names); 2: in-LLM stage fields, per-layer KV dtypes, engines
READABLE_VERSIONS = (2, 3)  # version 2 is upgraded on read (_upgrade_v2)
MANIFEST = "manifest.json"
UNCOMPRESSED = "none"  # compression.method of an artifact that keeps every visual token (vtc.export.methods.NONE)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, int64, ...
    shape: list  # ints, or strings for symbolic dims (seq, past_seq)


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # named static shape sets the runtime uses: {"prefill": {"seq": 160, "past_seq": 0}, ...}
    profiles: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelInfo:
    architecture: str  # registry model_type, e.g. "llava"
    source: str  # absolute path of the source checkpoint
    demo: bool  # the built-in random-weight demo model (its text is meaningless)
    image_token: str
    image_token_id: int


@dataclass(frozen=True)
class CompressionInfo:
    method: str
    ratio: float
    options: dict
    n_visual: int  # N: visual tokens before compression
    k_visual: int  # K: visual tokens kept (static)
    grid: list  # [rows, cols] patch grid
    has_cls: bool  # visual token 0 is the vision [CLS] token
    stage: str  # "vision": compressed in the vision graph; "llm": pruned inside the LLM at work_layer
    work_layer: int | None  # W for stage "llm" (graphs llm_pre = layers [0, W), llm_post = [W, L))
    kv_visual_per_layer: list  # [L] visual tokens each layer's KV cache holds after prefill
    selector: str | None = None  # stage "llm": the runtime selection between the segments (vtc.runtime.selectors)


@dataclass(frozen=True)
class LMInfo:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    rope: str = "1d"  # position scheme (vtc.runtime.positions)


@dataclass(frozen=True)
class TextInfo:
    budget: int  # max text tokens per prompt (excluding the K visual tokens)
    max_seq_len: int  # KV cache length: prompt + visual + generated tokens
    eos_token_ids: list
    chat_template: str | None  # file name in the artifact, or None (prompts must then be --raw)
    tokenizer_as_is: bool = False  # tokenizer.json is used whatever tokenizer_class says (as transformers does for it)
    # what the image token expands to: the per-tile text with one image token per block of visual tokens
    # (Idefics3/SmolVLM; the K visual tokens are split evenly over the blocks); None = the image token itself
    image_prompt: str | None = None


@dataclass(frozen=True)
class KVCacheInfo:
    dtype: str  # requested storage: float32 | float16 | int8 | float8_e4m3fn
    layer_dtypes: list  # [L] per layer, after fallback (a layer whose error is too high stays float16)
    layout: str
    bytes_per_token: int  # all layers, keys + values, including nothing else (scales are constants)
    bytes_total: int  # at max_seq_len
    scales: str | None  # kv_scales.json in the artifact (int8 / fp8), else None
    scale_source: str | None  # how the scales were made: calibration set, or a user file (+ sha256)
    fallback_layers: list  # layers kept in float16 because their quantization error exceeded the threshold
    accuracy: dict  # quantized vs float32 KV on held-out pairs (empty for float32)


@dataclass(frozen=True)
class EngineInfo:
    """TensorRT engines built from the graphs, valid only for this TensorRT version and GPU architecture
    (`vtc-export build --backend tensorrt` or `vtc-export engine DIR`; see vtc.export.tensorrt)."""

    tensorrt_version: str  # trt.__version__ at build time; the runtime refuses any other
    device: str  # GPU name the engines were built on
    compute_capability: str  # "8.7" (Orin), "9.0" (H100), ...; the runtime refuses any other
    precision: str  # fp16 | bf16 | fp32 (int8/fp8 only where a graph has Q/DQ: graphs[g]["quantized"])
    graphs: dict  # graph name -> {"file": "engines/llm.plan", "profiles": ["prefill", "decode"], "quantized": []}
    options: dict  # workspace_gb, timing_cache, builder_optimization_level as asked


@dataclass(frozen=True)
class WeightsInfo:
    """Weight-only quantization of the LLM graphs (build --weights int8|int4; vtc.export.wquant): constant
    int8/int4 weights + DequantizeLinear -> MatMul, plugin-free."""

    dtype: str  # int8 (per output channel) | int4 (blocks of group_size along the input dim)
    group_size: int | None  # int4 block size; None for int8
    algo: str  # rtn | awq (scales searched on the calibration set and folded in before export)
    layers: int  # linear layers quantized, all LLM graphs together
    lm_head: bool  # the LM head too (int8)
    bytes_before: int  # the quantized layers' float weights
    bytes_after: int  # their int8/int4 weights + scales
    graphs: dict  # graph name -> {layers, lm_head, bytes_before, bytes_after, data_bytes_before, data_bytes_after, opset,
    #               clipped, matmuls (optional: quantized MatMul nodes, q/k/v and gate/up fused)}
    min_tensorrt: str | None  # the oldest TensorRT that parses these graphs (INT4: opset 21)
    awq: dict  # the AWQ search summary (empty for rtn)
    accuracy: dict  # quantized vs float weights on held-out pairs (as kv_cache.accuracy); empty if not measured


@dataclass(frozen=True)
class Manifest:
    schema: str
    schema_version: int
    vtc_version: str
    created_utc: str
    build_args: dict
    model: ModelInfo
    compression: CompressionInfo
    lm: LMInfo
    text: TextInfo
    kv_cache: KVCacheInfo
    graphs: dict[str, GraphSpec]
    embeddings: dict  # {"file": "embed_tokens.npy", "dtype": ..., "shape": [V, D]}
    preprocess: dict  # ImagePreprocessor.to_dict()
    parity: dict
    files: dict  # relative path -> {"sha256": str, "bytes": int}
    engines: EngineInfo | None = None  # optional: TensorRT engines (absent in ONNX-only artifacts)
    dtype: str = "float32"  # weights and activations of every graph (build --dtype): float32 | float16 | bfloat16
    weights: WeightsInfo | None = None  # optional: quantized LLM weights (absent or null = float weights, `dtype`)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"


def _parse(tp, value, where: str):
    """Convert JSON `value` to type `tp`, strictly."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ArtifactError(f"manifest field {where} must be an object.", "Rebuild the artifact.")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        missing = sorted(n for n in names if n not in value and _required(tp, n))
        if unknown or missing:
            raise ArtifactError(f"manifest {where or 'root'} has unknown keys {unknown} / missing keys {missing}.",
                                "It was written by another vtc version or edited by hand: rebuild the artifact.")
        return tp(**{k: _parse(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in value.items()})
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        _expect(value, list, where)
        return [_parse(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp) or (str, Any)
        _expect(value, dict, where)
        return {k: _parse(item, v, f"{where}.{k}") for k, v in value.items()}
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in typing.get_args(tp):
            return None
        return _parse(next(a for a in typing.get_args(tp) if a is not type(None)), value, where)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    _expect(value, tp, where)
    return value


def _required(tp, name: str) -> bool:
    f = next(f for f in dataclasses.fields(tp) if f.name == name)
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _expect(value, tp, where):
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ArtifactError(f"manifest field {where} should be {tp.__name__}, got {type(value).__name__}.",
                            "Rebuild the artifact.")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(root: Path) -> dict:
    """{relative path: {sha256, bytes}} for every file under root except the manifest."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def parse(text: str | bytes, source: str = MANIFEST) -> Manifest:
    """A Manifest from manifest.json's text (or UTF-8 bytes): strict types, then every field the runtime
    reads against its bounds (artifact_check.validate). Any problem is one ArtifactError."""
    from vtc.runtime import artifact_check

    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ArtifactError(f"{source} is not UTF-8 text ({e.reason} at byte {e.start}).",
                                "The artifact is damaged: rebuild it.") from e
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, a 5000-digit int, nesting too deep for the parser
        why = e if isinstance(e, json.JSONDecodeError) else f"{type(e).__name__}: {str(e)[:80]}"
        raise ArtifactError(f"{source} is not valid JSON ({why}).", "The artifact is damaged: rebuild it.") from e
    _check_json(raw, source)
    if not isinstance(raw, dict) or raw.get("schema") != SCHEMA:
        raise ArtifactError(f"{source} is not a vtc artifact manifest.", "Point at a directory `vtc-export build` wrote.")
    version = raw.get("schema_version")
    if version == 2 and not isinstance(version, bool):
        raw = _upgrade_v2(raw)
    elif version != SCHEMA_VERSION or isinstance(version, bool):
        newer = isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION
        raise ArtifactError(f"{source} has manifest schema version {version!r}; this vtc reads versions "
                            f"{', '.join(map(str, READABLE_VERSIONS))}.",
                            "Upgrade vtc to run it." if newer else "Rebuild the artifact with this vtc.")
    m = _parse(Manifest, raw, "")
    artifact_check.validate(m)
    return m


def _check_json(raw, source: str) -> None:
    """Nesting depth and strings (no NUL, no lone surrogates) of the whole document, iteratively."""
    from vtc.runtime.artifact_check import LIMITS

    stack = [(raw, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > LIMITS["json_depth"]:
            raise ArtifactError(f"{source} nests deeper than {LIMITS['json_depth']} levels.",
                                "The artifact is damaged: rebuild it.")
        if isinstance(node, dict):
            stack.extend((k, depth + 1) for k in node)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
        elif isinstance(node, str):
            if "\x00" in node:
                raise ArtifactError(f"{source} has a string with a NUL character.", "The artifact is damaged: rebuild it.")
            try:
                node.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ArtifactError(f"{source} has a string that is not valid Unicode ({e.reason}).",
                                    "The artifact is damaged: rebuild it.") from e


def _upgrade_v2(raw: dict) -> dict:
    """Version 2 artifacts (vtc 0.1) are all LLaVA: tokenizer.json as is, 1-D RoPE, and an in-LLM
    method's selector is the method of the same name."""
    raw = dict(raw)
    comp, text = raw.get("compression"), raw.get("text")
    if isinstance(comp, dict) and comp.get("stage") == "llm" and "selector" not in comp:
        raw["compression"] = {**comp, "selector": comp.get("method")}
    if isinstance(text, dict) and "tokenizer_as_is" not in text:
        raw["text"] = {**text, "tokenizer_as_is": True}
    return raw


def load(artifact_dir: Path, check_files: str | bool = "sizes") -> Manifest:
    """Read and validate `artifact_dir/manifest.json`, then check the files it lists at level `check_files`:
    "sizes" (default): every path confined to the directory, a regular file without symlinks, listed, of
    the listed size (small files hashed too), graph I/O as the ONNX files declare it; "hashes" (True):
    also every file's sha256; False: no file checks (the caller checked them)."""
    return load_with_digest(artifact_dir, check_files)[0]


def load_with_digest(artifact_dir: Path, check_files: str | bool = "sizes") -> tuple[Manifest, str]:
    """`load`, and the artifact digest: the sha256 of the manifest.json bytes that were parsed (the
    manifest lists every file's sha256, so pinning the digest pins the whole artifact)."""
    import os
    import stat

    from vtc.runtime import artifact_check

    level = artifact_check.level(check_files)
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not artifact_dir.exists():
        raise ArtifactError(f"artifact directory {artifact_dir} does not exist.", "Build one with `vtc-export build`.")
    if not artifact_dir.is_dir():
        raise ArtifactError(f"{artifact_dir} is not a directory, so it is not a vtc artifact.",
                            "Pass the directory `vtc-export build --output` wrote.")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ArtifactError(f"cannot read {path} ({e.strerror}).", "Check the directory's permissions.") from e
    if st is None or stat.S_ISDIR(st.st_mode):
        raise ArtifactError(f"{artifact_dir} has no {MANIFEST}: it is not a (complete) vtc artifact.",
                            "Build one with `vtc-export build`; builds write the manifest last.")
    if not stat.S_ISREG(st.st_mode):
        raise ArtifactError(f"{path} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a regular file'}; "
                            "an artifact's manifest is a regular file inside it.", "Rebuild the artifact.")
    limit = artifact_check.LIMITS["manifest_bytes"]
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ArtifactError(f"cannot read {path} ({e.strerror or e}).", "Check its permissions, or rebuild it.") from e
    if len(data) > limit:
        raise ArtifactError(f"{path} is larger than {limit} bytes, which no vtc manifest is.",
                            "The artifact is damaged: rebuild it.")
    manifest = parse(data, str(path))
    if level is not None:
        artifact_check.check_files(artifact_dir, manifest, level)
    return manifest, artifact_check.digest(data)


def verify_files(artifact_dir: Path, manifest: Manifest, check_files: str | bool = "hashes") -> None:
    """The files `manifest` lists in `artifact_dir`, at level `check_files` (default: every sha256)."""
    from vtc.runtime import artifact_check

    level = artifact_check.level(check_files)
    if level is not None:
        artifact_check.check_files(Path(artifact_dir), manifest, level)
