"""Tracing the graphs to plugin-free ONNX (torch.onnx.export, dynamo=True, opset 18), as lazy loaders.

vision.onnx   pixel_values [1, 3, H, W] -> image_embeds [1, K, D], kept_index [1, K], token_map [1, N] int64
llm.onnx      see vtc.export.llm (one graph for prefill and decode; weights in llm.onnx.data)
select.onnx   FastV's selection between llm_pre and llm_post (vtc.export.methods.fastv)

Each export is a loader in Polygraphy's style: the arguments go to `__init__`, nothing runs until it is
called with the output path, and it returns the graph's GraphSpec. The build composes them; the sweep's
graph cache wraps them (vtc.export.graph_cache.Cached) instead of patching this module.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from vtc.export.llm import TORCH_DTYPE, StaticCacheLM
from vtc.export import graph_cache
from vtc.export.methods.base import Method, Plan
from vtc.export.models.base import VisualSpec
from vtc.runtime.errors import ExportError
from vtc.runtime.manifest import GraphSpec, TensorSpec

OPSET = 18
FP8_OPSET = 19  # float8 Q/DQ needs opset >= 19
MAX_SEQ_DIM = 32768
EXTERNAL_ABOVE_BYTES = 256 << 20  # graphs whose model holds more weights than this store them in <graph>.onnx.data


class VisionGraph(nn.Module):
    """Vision tower + projector + compressor: pixel_values -> (image_embeds, kept_index, token_map)."""

    def __init__(self, adapter, model, method: Method, plan: Plan, spec: VisualSpec):
        super().__init__()
        self.adapter, self.model, self.method, self.plan, self.spec = adapter, model, method, plan, spec

    def forward(self, pixel_values):
        return self.method.vision_forward(self.adapter, self.model, pixel_values, self.spec, self.plan)


@contextlib.contextmanager
def quiet_export():
    """torch.onnx prints progress lines and torchvision-missing warnings on every export; the CLI has
    its own progress display, so they are captured here (and re-raised with the error on failure)."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._dynamo", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


# Bumped when the exported graphs change for the same model and arguments (the sweep's graph cache keys on it).
EXPORT_REVISION = 4  # 2: RMSNorm as Div(x, Sqrt(.)) (rms_norm_as_div); 3: past scores as (K q^T)^T; 4: q/k/v and gate/up fused in quantized graphs


def rms_norm_as_div():
    """onnxscript rewrite rule: `x * Reciprocal(Sqrt(a))` (how torch.rsqrt exports) -> `Div(x, Sqrt(a))`.

    HF's RMSNorm (Llama, Qwen2, SmolLM) is `x * rsqrt(mean(x^2) + eps) * w`. ONNX Runtime's
    SimplifiedLayerNormFusion only recognises the Div form, so the rsqrt form runs as 7 small kernels per
    norm instead of one (17 norms in the bench-size LLaVA's 8 layers). Same standard ops, same math (a
    division instead of a multiplication by the reciprocal: within 1 ulp); TensorRT's parser takes both."""
    from onnxscript.rewriter import pattern

    def target(op, x, a):
        return op.Mul(x, op.Reciprocal(op.Sqrt(a)))

    def replacement(op, x, a):
        return op.Div(x, op.Sqrt(a))

    return pattern.RewriteRuleSet([pattern.RewriteRule(target, replacement, name="RmsNormAsDiv")], commute=True)


_RULES = None  # built once: onnxscript's pattern compilation is not free


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes, external: bool,
            opset: int = OPSET) -> None:
    global _RULES
    from onnxscript import rewriter

    _RULES = _RULES or rms_norm_as_div()
    with quiet_export() as buf:
        try:
            with torch.no_grad():
                program = torch.onnx.export(module, args, None, input_names=input_names, output_names=output_names,
                                            dynamic_shapes=dynamic_shapes, dynamo=True, opset_version=opset,
                                            optimize=True, verbose=False)
            rewriter.rewrite(program.model, pattern_rewrite_rules=_RULES)
            program.save(str(path), external_data=external)
            del program
        except Exception as e:  # torch.export raises many unrelated types; all mean "could not trace"
            log = Path(tempfile.mkstemp(prefix=f"vtc-export-{path.stem}-", suffix=".log")[1])
            log.write_text(f"{type(e).__name__}: {e}\n\n{buf.getvalue()}")
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ExportError(f"exporting {path.name} failed: {type(e).__name__}: {first[:300]}",
                              f"Full exporter log: {log}. Please report it with the model config.") from e
        finally:
            _drop_rewriter_references()
    onnx.checker.check_model(str(path), full_check=False)


def _drop_rewriter_references() -> None:
    """onnxscript's default rewrite rules (run by torch.onnx.export's `optimize=True`) are module-level objects
    whose matchers keep the last graph they looked at (`_graph`, `_current_node`, `_match`), and through it every
    initializer of the exported model: the PyTorch weights stay alive after the export (measured: 1.1 GiB of the
    2-layer 7B-geometry LLM's 1.8 GiB). Dropping those references lets the memory-lean build free the model."""
    try:
        from onnxscript import rewriter
    except ImportError:
        return
    ours = _RULES.rules if _RULES is not None else ()
    for rule in (*getattr(rewriter, "_DEFAULT_REWRITE_RULES", ()), *ours):
        matcher = getattr(rule, "_matcher", None)
        for attr in ("_graph", "_current_node", "_match"):
            if matcher is not None and hasattr(matcher, attr):
                setattr(matcher, attr, None)


def graph_spec(path: Path, profiles: dict | None = None) -> GraphSpec:
    """Names, dtypes and shapes of a graph's inputs/outputs, read back from the ONNX file."""
    model = onnx.load(str(path), load_external_data=False)

    def tensors(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append(TensorSpec(name=v.name, dtype=dtype, shape=shape))
        return out

    return GraphSpec(file=path.name, inputs=tensors(model.graph.input), outputs=tensors(model.graph.output),
                     profiles=profiles or {})


class GraphLoader:
    """Call with the output path: exports the graph there and returns its GraphSpec."""

    label = "exporting a graph"
    profiles: dict = {}  # the GraphSpec's named shape sets (manifest)

    def __call__(self, path: Path) -> GraphSpec:
        return self.call_impl(Path(path))

    def call_impl(self, path: Path) -> GraphSpec:
        raise NotImplementedError

    def cache_key(self, filename: str) -> str | None:
        """What the exported file depends on (vtc.export.graph_cache); None = never reuse."""
        return None


class ExportVision(GraphLoader):
    profiles = {"static": {}}

    def __init__(self, graph: VisionGraph, image_size: int):
        self.graph, self.image_size = graph, image_size
        p = graph.plan
        self.label = f"exporting vision encoder + projector + {p.method} ({p.k} of {p.n} tokens)"

    def call_impl(self, path: Path) -> GraphSpec:
        dtype = next(self.graph.model.parameters()).dtype  # pixel_values in the graph dtype (build --dtype)
        # [images, 3, H, W]: 1 image, or a tiling architecture's tiles + global image as one static batch
        pixels = torch.randn(*self.graph.adapter.pixel_shape(self.graph.model), dtype=dtype)
        # a large tower (CLIP-L: 0.6 GB in fp16) goes to vision.onnx.data: protobuf stops at 2 GiB, and the
        # external data is read straight into the runtime's memory instead of through a parsed message
        weights = sum(p.numel() * p.element_size() for p in self.graph.model.parameters())
        _export(self.graph, (pixels,), path, ["pixel_values"], ["image_embeds", "kept_index", "token_map"], None,
                external=weights > EXTERNAL_ABOVE_BYTES)
        return graph_spec(path, self.profiles)

    def cache_key(self, filename: str) -> str | None:
        shape = self.graph.adapter.pixel_shape(self.graph.model)
        square = shape[0] == 1 and shape[2] == shape[3]  # else the whole shape (tiles; Qwen2-VL's H x W)
        return graph_cache.vision_key(self.graph, self.image_size if square else list(shape), filename)


def llm_io_names(first: int, end: int, head: bool) -> tuple[list[str], list[str]]:
    """Input and output names of an LLM segment over layers [first, end); KV names use global layer ids."""
    kv = [f"past_{kind}.{i}" for i in range(first, end) for kind in ("key", "value")]
    present = [n.replace("past_", "present_") for n in kv]
    if head:
        start = "inputs_embeds" if first == 0 else "hidden_states"
        return [start, "position_ids", "past_lengths", "logits_index", *kv], ["logits", *present]
    return ["inputs_embeds", "position_ids", "past_lengths", *kv], ["hidden_states", "last_attn", *present]


class _NoHead(nn.Module):
    """A segment that ends before the LM head takes no logits_index."""

    def __init__(self, lm: StaticCacheLM):
        super().__init__()
        self.lm = lm

    def forward(self, hidden, position_ids, past_lengths, past):
        return self.lm(hidden, position_ids, past_lengths, None, past)


class ExportLLM(GraphLoader):
    """An LLM segment (or the whole LLM) over the runtime-owned cache; `profiles` go to the manifest."""

    def __init__(self, lm: StaticCacheLM, num_kv_heads: int, hidden: int, profiles: dict, label: str):
        self.lm, self.num_kv_heads, self.hidden, self.profiles, self.label = lm, num_kv_heads, hidden, profiles, label

    def call_impl(self, path: Path) -> GraphSpec:
        return export_llm(self.lm, self.num_kv_heads, self.hidden, path, self.profiles)

    def cache_key(self, filename: str) -> str | None:
        return graph_cache.llm_key(self.lm, self.num_kv_heads, self.hidden, filename)


def export_llm(lm: StaticCacheLM, num_kv_heads: int, hidden: int, path: Path, profiles: dict) -> GraphSpec:
    """Trace with S=3, P=4 (torch.export specialises sizes 0 and 1); both dims stay symbolic."""
    n_layers, seq, past = lm.num_layers, 3, 4
    dtypes = lm.kv.dtypes[lm.first:lm.end]
    kv = tuple(torch.randn(1, num_kv_heads, past, lm.head_dim).to(TORCH_DTYPE[dtypes[j // 2]]) for j in range(2 * n_layers))
    s_dim = torch.export.Dim("seq", min=1, max=MAX_SEQ_DIM)
    p_dim = torch.export.Dim("past_seq", min=0, max=MAX_SEQ_DIM)
    act = next(lm.parameters()).dtype  # the graph's activations: the weights' dtype (build --dtype)
    pos = lm.example_positions(seq)  # [1, S], or [3, 1, S] for M-RoPE
    common = (torch.randn(1, seq, hidden, dtype=act), pos, torch.full((n_layers,), past, dtype=torch.int64))
    # torch.onnx matches dynamic_shapes to inputs by position: keep the forward signature's order.
    dyn = {"hidden": {1: s_dim}, "position_ids": {pos.dim() - 1: s_dim}, "past_lengths": None}
    past_dyn = tuple({2: p_dim} for _ in range(2 * n_layers))
    if lm.has_head:
        module, args, dyn = lm, (*common, torch.tensor([seq - 1]), kv), {**dyn, "logits_index": None, "past": past_dyn}
    else:
        module, args, dyn = _NoHead(lm), (*common, kv), {**dyn, "past": past_dyn}
    inputs, outputs = llm_io_names(lm.first, lm.end, lm.has_head)
    opset = FP8_OPSET if "float8_e4m3fn" in dtypes else OPSET
    _export(module, args, path, inputs, outputs, dyn, external=True, opset=opset)
    if any(d in ("int8", "float8_e4m3fn") for d in dtypes):
        from vtc.export.qdq import cast_to_qdq

        cast_to_qdq(path)  # explicit Q/DQ instead of Cast, for TensorRT
    onnx.checker.check_model(str(path), full_check=False)
    return graph_spec(path, profiles)


class ExportSelect(GraphLoader):
    """A selection graph between LLM segments: hidden_states [1, S, D], last_attn [1, S], image_start [1]
    -> kept_hidden_states [1, S', D], keep_index [1, S'] (module: e.g. fastv.SelectGraph, with `n`)."""

    label = "exporting the in-LLM selection graph"
    profiles = {"prefill": {"seq": "prompt length"}}

    def __init__(self, module: nn.Module, hidden: int, dtype: torch.dtype = torch.float32):
        self.module, self.hidden, self.dtype = module, hidden, dtype

    def call_impl(self, path: Path) -> GraphSpec:
        n = self.module.n
        seq = n + 5
        args = (torch.randn(1, seq, self.hidden, dtype=self.dtype), torch.rand(1, seq), torch.tensor([2]))
        s_dim = torch.export.Dim("seq", min=n + 1, max=MAX_SEQ_DIM)
        dyn = {"hidden_states": {1: s_dim}, "last_attn": {1: s_dim}, "image_start": None}
        _export(self.module, args, path, ["hidden_states", "last_attn", "image_start"],
                ["kept_hidden_states", "keep_index"], dyn, external=False)
        return graph_spec(path, self.profiles)


class EagerGraph:
    """An nn.Module behind a runtime session's interface, `run(feeds) -> [outputs]` (numpy in and out):
    the reference runs a method's extra graphs eagerly through the same runtime selector."""

    def __init__(self, module: nn.Module, input_names: tuple[str, ...]):
        self.module, self.input_names, self.seconds = module, input_names, 0.0

    def run(self, feeds: dict) -> list:
        with torch.no_grad():
            outs = self.module(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        return [o.numpy() for o in outs]
