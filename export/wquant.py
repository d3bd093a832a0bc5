"""Weight-only quantization of the exported LLM graphs, as plugin-free standard ONNX.

`build --weights int8|int4` runs this pass on llm.onnx (or llm_pre/llm_post) after export. Each linear
layer's float weight W [K, N] (nn.Linear exported by torch.onnx dynamo as MatMul(x, W) with W = the
pre-transposed weight initializer) becomes

    int8   q = clamp(round(W / s), -127, 127),  s[n] = max_k |W[k, n]| / 127       (per output channel)
           DequantizeLinear(q int8 [K, N], s [N], axis=1)                      -> MatMul   (opset 13+)
    int4   q = clamp(round(W / s), -8, 7),      s[b, n] = max_{k in block b} |W[k, n]| / 7
           blocks of --group-size rows along K (the input dim)
           DequantizeLinear(q int4 [K, N], s [K/g, N], axis=0, block_size=g)   -> MatMul   (opset 21)

symmetric, no zero point: TensorRT takes only zero points of 0 (onnx-tensorrt DequantizeLinear row), and
ONNX Runtime needs none. The scale has the graph's activation dtype (the DQ output type is the scale's).
The DQ output keeps the weight's old tensor name, so the MatMul is untouched.

The fast path, measured with onnxruntime 1.32 (CPU, ORT_ENABLE_EXTENDED or higher, the runtime's ALL):
both forms fuse into one `MatMulNBits` node (com.microsoft, created by ORT at load time, never in the file):
int4 blocked -> bits=4, block_size=g; int8 per-channel -> bits=8, re-blocked with the channel's scale
repeated per block (ORT's default block 32; the runtime asks for its min-padding choice, <= 256:
vtc.runtime.backend.PER_CHANNEL_BLOCK). With ORT's default accuracy_level 4 the activations are quantized to
int8 per block inside MatMulNBits (~0.5% relative error per MatMul on random data; level 0/1 is exact).
`fast_path` reports the optimized graph, opened with the runtime's settings.

Memory: the graph is loaded without its weights; each initializer is read from the .data file by
offset/length in row chunks (CHUNK_ELEMENTS), quantized and streamed to a new data file, so a 13 GB fp16
graph needs about one chunk of memory. The new graph and data are written next to the old ones and
moved into place with os.replace (the graph cache hard-links exported files: they are never written in
place). Which layers: MatMuls whose second input is a 2-D float initializer used only as a MatMul weight
(q/k/v/o, gate/up/down); the LM head (the first such MatMul upstream of the `logits` output) with
--lm-head int8 (the default; `--lm-head fp` keeps it float), and then always as int8 per channel. With --weights-algo awq the float model arrives already scaled
(vtc.calibration.awq, before export), with clipping thresholds per weight that this pass applies: each
int4 block is clamped to +-clip before its scale is taken.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vtc.runtime.errors import ExportError, ModelError, UsageError

WEIGHT_DTYPES = ("fp", "int8", "int4")
ALGOS = ("rtn", "awq")
LM_HEAD = ("int8", "fp")  # --lm-head with --weights int8|int4 (default int8: the head is the largest single
#                           MatMul of a decode step, 131 MB fp32 of 234 MB on the bench-size LLaVA's int8 graph)
LLM_GRAPHS = ("llm", "llm_pre", "llm_post")
QRANGE = {"int8": (-127, 127), "int4": (-8, 7)}  # symmetric: s = absmax / QRANGE[1]
INT4_OPSET = 21  # DequantizeLinear-21: int4 and block_size
HALF_SCALE_OPSET = 19  # DequantizeLinear-19: float16 / bfloat16 scales (int8 weights of an fp16/bf16 graph)
INT4_IR_VERSION = 10  # INT4 tensors
MIN_GROUP = 16  # ONNX Runtime's MatMulNBits takes block sizes 16, 32, 64, ... (powers of two >= 16)
CHUNK_ELEMENTS = 1 << 24  # rows per read: ~64 MB of float32 at a time
ALIGN = 64  # offsets in the new data file
FLOAT_TYPES = {1: np.float32, 10: np.float16, 16: "bfloat16"}  # TensorProto FLOAT, FLOAT16, BFLOAT16
# Ops the graphs use whose schema changed between opset 18/19 and 21, and why each is unchanged for vtc's
# graphs: the revisions only add types (float8, int4, uint4, string, bool) or attributes whose defaults keep
# the old behaviour (Cast-19 saturate: float8 targets only; Pad-19 'wrap': a new mode; DQ/Q-21 block_size).
# Any other revised op (e.g. GroupNormalization-21, DFT-20) stops the pass.
SAME_MEANING_18_TO_21 = {"Cast", "CastLike", "Constant", "ConstantOfShape", "DequantizeLinear", "QuantizeLinear",
                         "Equal", "Flatten", "Identity", "Pad", "ReduceMax", "ReduceMin", "Reshape", "Shape", "Size",
                         "Squeeze", "Unsqueeze", "Transpose", "If", "Loop", "Scan"}


@dataclass(frozen=True)
class Linear:
    """One linear layer found in a graph: its weight initializer [K, N] (in, out)."""

    name: str
    k: int
    n: int
    head: bool = False


@dataclass
class GraphResult:
    layers: int = 0
    lm_head: bool = False
    bytes_before: int = 0  # the quantized layers' float weights
    bytes_after: int = 0  # their int8/int4 weights + scales
    data_bytes_before: int = 0  # the whole <graph>.onnx.data
    data_bytes_after: int = 0
    opset: int = 18
    clipped: int = 0  # int4 layers clamped to AWQ's clipping thresholds before quantization
    matmuls: int = 0  # quantized MatMul nodes: q/k/v and gate/up fused (sibling_groups), so fewer than layers


@dataclass
class WeightsRecord:
    """What `--weights` did (the manifest's `weights` entry; accuracy is added by the build's checks)."""

    dtype: str
    group_size: int | None
    algo: str
    layers: int = 0
    lm_head: bool = False
    bytes_before: int = 0
    bytes_after: int = 0
    graphs: dict = field(default_factory=dict)
    min_tensorrt: str | None = None
    awq: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)

    def add(self, name: str, r: GraphResult) -> None:
        self.graphs[name] = asdict(r)
        self.layers += r.layers
        self.lm_head = self.lm_head or r.lm_head
        self.bytes_before += r.bytes_before
        self.bytes_after += r.bytes_after

    def info(self):
        from vtc.runtime import manifest as mf

        return mf.WeightsInfo(**asdict(self))


# -- checks ----------------------------------------------------------------------------------------
def check_args(weights: str, group_size: int, algo: str, lm_head: str | None = None) -> None:
    """The flags alone (vtc.export.build._check_args)."""
    if weights not in WEIGHT_DTYPES:
        raise UsageError(f"--weights {weights!r} is not one of {', '.join(WEIGHT_DTYPES)}.", "Pass e.g. --weights int4.")
    if lm_head not in (None, *LM_HEAD):
        raise UsageError(f"--lm-head {lm_head!r} is not one of {', '.join(LM_HEAD)}.", "Pass int8 (the default) or fp.")
    if lm_head == "int8" and weights == "fp":
        raise UsageError("--lm-head int8 quantizes the LM head along with the linear layers, but --weights is fp.",
                         "Add --weights int8 (or int4), or drop --lm-head.")
    if algo not in ALGOS:
        raise UsageError(f"--weights-algo {algo!r} is not one of {', '.join(ALGOS)}.", "Pass rtn or awq.")
    if algo == "awq" and weights != "int4":
        raise UsageError(f"--weights-algo awq searches scales for int4 weights, but --weights is {weights}.",
                         "Pass --weights int4 with --weights-algo awq (int8 weights need no search: use rtn).")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < MIN_GROUP \
            or group_size & (group_size - 1):
        raise UsageError(f"--group-size {group_size} is not a power of two >= {MIN_GROUP} (ONNX Runtime's MatMulNBits "
                         "kernel takes 16, 32, 64, 128, 256, ...).", "Pass e.g. --group-size 128 (the default).")


def segments(bp) -> dict[str, tuple[int, int]]:
    """LLM graph name -> (first, end) decoder layers it holds (vtc.export.build.graph_loaders)."""
    n = bp.lm.num_layers
    w = bp.method.work_layer(bp.plan)
    return {"llm": (0, n)} if w is None else {"llm_pre": (0, w), "llm_post": (w, n)}


def check_model(bp) -> None:
    """Before export: the architecture has Llama-style linear layers, and with int4 the group size divides
    every layer's input dim (each linear layer's K)."""
    args = bp.args
    if args.weights == "fp":
        return
    lm = bp.adapter.static_cache_lm(bp.model)
    layers = getattr(getattr(lm, "decoder", None), "layers", None)
    if not layers or not all(_llama_linears(layer) for layer in layers):
        raise ModelError(f"--weights {args.weights} quantizes Llama-family decoder layers (q/k/v/o, gate/up/down), and "
                         f"this {bp.adapter.model_type} language model has another structure.",
                         "Build it with --weights fp; weight quantization for this architecture is not implemented.")
    if args.weights != "int4":
        return
    dims = sorted({m.in_features for layer in layers for m in _llama_linears(layer).values()})
    bad = [k for k in dims if k % args.group_size]
    if bad:
        fits = _largest_group(dims)
        raise UsageError(f"--group-size {args.group_size} does not divide the input dim {bad[0]} of this model's linear "
                         f"layers (input dims: {', '.join(map(str, dims))}); int4 blocks run along the input dim.",
                         f"Pass --group-size {fits} (the largest that divides them all)." if fits else
                         "No power of two >= 16 divides them all: use --weights int8.")


def _largest_group(dims: list[int]) -> int | None:
    g = 1 << 12
    while g >= MIN_GROUP and any(k % g for k in dims):
        g //= 2
    return g if g >= MIN_GROUP else None


def _llama_linears(layer) -> dict:
    """{name: nn.Linear} of one Llama-family decoder layer, or {} if it is not one."""
    from torch import nn

    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj")
    mods = dict(layer.named_modules())
    found = {n: mods.get(n) for n in names}
    return found if all(isinstance(m, nn.Linear) for m in found.values()) else {}


def expected_linears(bp, first: int, end: int) -> int:
    lm = bp.adapter.static_cache_lm(bp.model)
    return sum(len(_llama_linears(lm.decoder.layers[i])) for i in range(first, end))


# -- finding the linear layers ---------------------------------------------------------------------
def find_linears(model) -> list[Linear]:
    """MatMuls whose second input is a 2-D float initializer used only as a MatMul weight."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    inputs = {i.name for i in graph.input}
    users: dict[str, list] = {}
    for node in graph.node:
        for idx, name in enumerate(node.input):
            users.setdefault(name, []).append((node, idx))
    head = _head_weight(graph, inits)
    found = []
    for name, t in inits.items():
        uses = users.get(name, [])
        if (name in inputs or len(t.dims) != 2 or t.data_type not in FLOAT_TYPES or not uses
                or not all(n.op_type == "MatMul" and i == 1 for n, i in uses)):
            continue
        found.append(Linear(name=name, k=int(t.dims[0]), n=int(t.dims[1]), head=name == head))
    return found


def _head_weight(graph, inits: dict) -> str | None:
    """The weight of the MatMul nearest upstream of the `logits` output (breadth-first), if any."""
    producer = {o: n for n in graph.node for o in n.output}
    frontier, seen = ["logits"], set()
    while frontier:
        nxt = []
        for name in frontier:
            node = producer.get(name)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
                return node.input[1]
            nxt += list(node.input)
        frontier = nxt
    return None


# -- quantizers (numpy; calibration.awq mirrors them in torch for its search) -------------------------
def quantize_rows(w: np.ndarray, scale: np.ndarray, dtype: str, group: int | None) -> np.ndarray:
    """q = clamp(round(w / s)) for rows of W [R, N] (float32); scale [N] (int8) or [R/g, N] (int4)."""
    lo, hi = QRANGE[dtype]
    s = scale[None, :] if group is None else np.repeat(scale, group, axis=0)
    return np.clip(np.rint(w / s), lo, hi).astype(np.int8)


def scales_for(absmax: np.ndarray, dtype: str) -> np.ndarray:
    """s = absmax / qmax; an all-zero channel or block gets s = 1 (TensorRT needs every scale > 0)."""
    s = absmax.astype(np.float32) / QRANGE[dtype][1]
    return np.where(s > 0, s, np.float32(1.0))


def block_absmax(w: np.ndarray, group: int) -> np.ndarray:
    """[R, N] -> [R/g, N]: max |w| over each block of g rows."""
    return np.abs(w).reshape(w.shape[0] // group, group, w.shape[1]).max(axis=1)


def pack_int4(q: np.ndarray) -> bytes:
    """ONNX INT4 layout: two values per byte, element 2i in the low nibble (flat row-major order)."""
    flat = q.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def unpack_int4(data: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(data, np.uint8)
    out = np.empty(b.size * 2, np.int8)
    out[0::2], out[1::2] = (b & 0x0F).astype(np.int8), (b >> 4).astype(np.int8)
    return np.where(out > 7, out - 16, out).astype(np.int8)[:count]


def _to_float32(raw: np.ndarray, data_type: int) -> np.ndarray:
    if FLOAT_TYPES[data_type] == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def _from_float32(x: np.ndarray, data_type: int) -> bytes:
    if FLOAT_TYPES[data_type] == "bfloat16":  # round to nearest even
        u = x.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
    return x.astype(FLOAT_TYPES[data_type]).tobytes()


def _stored(scale: np.ndarray, data_type: int) -> np.ndarray:
    """The scale as the graph holds it (its dtype), back in float32: q is computed against that."""
    if data_type == 16:
        s = _to_float32(np.frombuffer(_from_float32(scale, data_type), np.uint16), data_type).reshape(scale.shape)
    else:
        s = scale.astype(FLOAT_TYPES[data_type]).astype(np.float32)
    return np.where(s > 0, s, np.float32(1.0))


# -- reading and writing external data -------------------------------------------------------------
class _Tensor:
    """An initializer's rows, read on demand from its external data file (or its inline bytes)."""

    def __init__(self, directory: Path, t):
        from onnx import helper, numpy_helper

        self.t, self.shape = t, tuple(int(d) for d in t.dims)
        ext = {e.key: e.value for e in t.external_data}
        self.external = t.data_location == 1 and "location" in ext  # TensorProto.EXTERNAL
        if self.external:
            self.file, self.offset = directory / ext["location"], int(ext.get("offset", 0))
            item = 2 if t.data_type == 16 else np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
            self.length = int(ext["length"]) if "length" in ext else int(np.prod(self.shape)) * item
        else:
            self.array = numpy_helper.to_array(t)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows [r0, r1) of the 2-D tensor as float32."""
        if not self.external:
            return self.array[r0:r1].astype(np.float32)
        raw_dtype = np.uint16 if FLOAT_TYPES[self.t.data_type] == "bfloat16" else FLOAT_TYPES[self.t.data_type]
        item, n = np.dtype(raw_dtype).itemsize, self.shape[1]
        m = np.memmap(self.file, dtype=raw_dtype, mode="r", offset=self.offset + r0 * n * item, shape=(r1 - r0, n))
        try:
            return _to_float32(np.asarray(m), self.t.data_type)
        finally:
            del m

    def sha256(self) -> str:
        """Of the raw bytes as stored (vtc.calibration.awq.weight_key computes the same from torch)."""
        import hashlib

        h = hashlib.sha256()
        if not self.external:
            h.update(self.t.raw_data)
            return h.hexdigest()
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            left = self.length
            while left > 0:
                block = f.read(min(left, 1 << 26))
                h.update(block)
                left -= len(block)
        return h.hexdigest()

    def copy_to(self, out: "_Data") -> int:
        """Stream the raw bytes into `out`; returns the new offset."""
        offset = out.begin()
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            left = self.length
            while left > 0:
                block = f.read(min(left, 1 << 26))
                if not block:
                    raise ExportError(f"{self.file.name} ends before tensor {self.t.name!r} does.",
                                      "The export was interrupted or damaged: rebuild.")
                out.write(block)
                left -= len(block)
        return offset


class _Data:
    """The new external data file, written front to back."""

    def __init__(self, path: Path, location: str):
        self.f, self.pos, self.location = open(path, "wb"), 0, location

    def begin(self) -> int:
        pad = -self.pos % ALIGN
        self.write(b"\0" * pad)
        return self.pos

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.pos += len(data)

    def tensor(self, name: str, data_type: int, dims, offset: int):
        import onnx

        t = onnx.TensorProto(name=name, data_type=data_type, dims=list(dims))
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(self.pos - offset))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t


def _quantized_rows(src: _Tensor, lin: Linear, dtype: str, group: int | None, clip=None):
    """Quantize a [K, N] weight in row chunks: (the per-channel scale [N] or None, a generator of (q rows,
    their [rows/g, N] block scales or None)). `clip` [K/g, N] (int4): each block is clamped to +-clip first
    (AWQ's clipping search)."""
    act = src.t.data_type
    k, n = lin.k, lin.n
    unit = group or 2  # rows per step: whole blocks, and an even element count (int4 packing)
    step = max(unit, (CHUNK_ELEMENTS // max(n, 1)) // unit * unit)
    scale = None
    if group is None:  # per channel: the column maxima first
        absmax = np.zeros(n, np.float32)
        for r0 in range(0, k, step):
            absmax = np.maximum(absmax, np.abs(src.rows(r0, min(k, r0 + step))).max(axis=0))
        scale = _stored(scales_for(absmax, dtype), act)

    def chunks():
        for r0 in range(0, k, step):
            w = src.rows(r0, min(k, r0 + step))
            if clip is not None:
                c = np.repeat(clip[r0 // group:(r0 + w.shape[0]) // group], group, axis=0)
                w = np.clip(w, -c, c)
            s = scale if group is None else _stored(scales_for(block_absmax(w, group), dtype), act)
            yield quantize_rows(w, s, dtype, group), (None if group is None else s)

    return scale, chunks()


def _write_quantized(name: str, act: int, shape, dtype: str, group: int | None, q_parts, scale_of, out: _Data):
    """Write q (int8 / packed int4; `q_parts`: row chunks of the [K, N] weight), then the scales (`scale_of()`,
    called after the rows, which bring int4's block scales); (q, scale, DequantizeLinear node), the node's
    output named `name`."""
    from onnx import TensorProto, helper

    q_off = out.begin()
    for q in q_parts:
        out.write(pack_int4(q) if dtype == "int4" else q.tobytes())
    q_t = out.tensor(f"{name}.wq", TensorProto.INT4 if dtype == "int4" else TensorProto.INT8, shape, q_off)
    scale = scale_of()
    s_off = out.begin()
    out.write(_from_float32(scale, act))
    s_t = out.tensor(f"{name}.wscale", act, scale.shape, s_off)
    attrs = {"axis": 1} if group is None else {"axis": 0, "block_size": group}
    node = helper.make_node("DequantizeLinear", [q_t.name, s_t.name], [name], name=f"{name}.dq", **attrs)
    return q_t, s_t, node


def _quantize_linear(src: _Tensor, lin: Linear, dtype: str, group: int | None, out: _Data, clip=None):
    """One weight, streamed row chunk by row chunk: (q TensorProto, scale TensorProto, DQ node)."""
    scale, chunks = _quantized_rows(src, lin, dtype, group, clip)
    blocks = []

    def q_parts():
        for q, s in chunks:
            if s is not None:
                blocks.append(s)
            yield q

    return _write_quantized(lin.name, src.t.data_type, (lin.k, lin.n), dtype, group, q_parts(),
                            lambda: scale if group is None else np.concatenate(blocks, axis=0), out)


def _quantize_fused(name: str, srcs: list, lins: list, dtype: str, group: int | None, out: _Data, clips: list):
    """Sibling weights [K, N_i] (one input: q/k/v, gate/up), each quantized exactly as on its own, stored as one
    [K, sum N_i] weight (concatenated along N, scales too): the same numbers, one MatMul (_fuse_matmuls)."""
    qs, scales = [], []
    for src, lin, clip in zip(srcs, lins, clips):
        scale, chunks = _quantized_rows(src, lin, dtype, group, clip)
        parts = list(chunks)
        qs.append(np.concatenate([q for q, _ in parts], axis=0))
        scales.append(scale if group is None else np.concatenate([s for _, s in parts], axis=0))
    q = np.concatenate(qs, axis=1)
    del qs
    scale = np.concatenate(scales, axis=-1)
    return _write_quantized(name, srcs[0].t.data_type, q.shape, dtype, group, [q], lambda: scale, out)


# -- the pass --------------------------------------------------------------------------------------
def quantize_graph(path: Path, dtype: str, group_size: int = 128, lm_head: bool = False,
                   expect: int | None = None, clips: dict | None = None) -> GraphResult:
    """Quantize the linear layers of the ONNX graph at `path` (weights in external data) in place.
    `expect`: how many decoder linear layers the graph must hold (an error otherwise); `clips`: AWQ's
    clipping thresholds {sha256 of the stored weight: [K/g, N]} for int4 (vtc.calibration.awq)."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    linears = [lin for lin in find_linears(model) if lm_head or not lin.head]
    body = sum(not lin.head for lin in linears)
    if expect is not None and body != expect:
        raise ExportError(f"{path.name}: found {body} linear-layer weights (MatMul with a 2-D float initializer), "
                          f"expected {expect}; the exported graph's structure is not the one weight quantization "
                          "knows.", "Build with --weights fp, and please report it with the model config.")
    group = group_size if dtype == "int4" else None
    bad = [lin for lin in linears if group and not lin.head and lin.k % group]
    if bad:
        raise UsageError(f"--group-size {group} does not divide the input dim {bad[0].k} of {path.name}'s linear "
                         f"layer {bad[0].name!r}.", f"Pass a --group-size that divides {bad[0].k}.")
    opset = _opset(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    half = any(types.get(lin.name, 1) != 1 for lin in linears)  # fp16/bf16 scales: DequantizeLinear-19 and up
    need = INT4_OPSET if dtype == "int4" else HALF_SCALE_OPSET if half else opset
    if opset < need:
        _check_opset_bump(model, opset, need, path.name)
    result = GraphResult(opset=max(opset, need))
    result.data_bytes_before = _data_bytes(path.parent, model)
    _rewrite(path, model, {lin.name: lin for lin in linears}, dtype, group, result, clips if group else None)
    return result


def sibling_groups(model, targets: dict) -> list[list[str]]:
    """Quantized weights of MatMuls that read the same activation (q/k/v; gate/up), to fuse into one MatMul:
    [[weight, ...], ...] in graph order, each group 2+ weights with one K and one float type, each weight
    feeding exactly one MatMul. LM heads stay alone."""
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    types = {t.name: t.data_type for t in model.graph.initializer}
    by_input: dict[str, list[str]] = {}
    for node in model.graph.node:
        w = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w in targets and not targets[w].head and uses[w] == 1:
            by_input.setdefault(node.input[0], []).append(w)
    return [ws for ws in by_input.values()
            if len(ws) > 1 and len({targets[w].k for w in ws}) == 1 and len({types[w] for w in ws}) == 1]


def _fuse_matmuls(nodes: list, groups: list[list[str]], targets: dict) -> tuple[list, list]:
    """Each group's MatMuls -> MatMul(x, fused weight) + Split along the last axis into the original outputs,
    placed where the group's first MatMul was; (new nodes, Split size initializers)."""
    from onnx import helper, numpy_helper

    group_of = {w: g for g in groups for w in g}
    out_of = {n.input[1]: n.output[0] for n in nodes if n.op_type == "MatMul" and n.input[1] in group_of}
    new, sizes = [], []
    for n in nodes:
        g = group_of.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) == 2 else None
        if g is None:
            new.append(n)
            continue
        if n.input[1] != g[0]:
            continue  # emitted with the group's first MatMul
        fused = f"{g[0]}.fused"
        sizes.append(numpy_helper.from_array(np.array([targets[w].n for w in g], np.int64), f"{fused}.split"))
        new.append(helper.make_node("MatMul", [n.input[0], fused], [f"{fused}.y"], name=f"{fused}.matmul"))
        new.append(helper.make_node("Split", [f"{fused}.y", sizes[-1].name], [out_of[w] for w in g],
                                    name=f"{fused}.split", axis=-1))
    return new, sizes


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_opset_bump(model, old: int, new: int, name: str) -> None:
    from onnx import defs

    for op in sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")}):
        if defs.get_schema(op, old).since_version != defs.get_schema(op, new).since_version \
                and op not in SAME_MEANING_18_TO_21:
            raise ExportError(f"{name} uses {op}, whose definition changed between opset {old} and {new}; the "
                              f"quantized weights need opset {new} (DequantizeLinear: int4 blocks from 21, "
                              "float16/bfloat16 scales from 19).",
                              "Build with --weights int8 --dtype fp32 (opset unchanged), or report the model config.")


def _data_bytes(directory: Path, model) -> int:
    locs = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return sum((directory / loc).stat().st_size for loc in locs if (directory / loc).is_file())


def _rewrite(path: Path, model, targets: dict, dtype: str, group: int | None, result: GraphResult,
             clips: dict | None = None) -> None:
    import onnx

    directory, location = path.parent, f"{path.name}.data"
    old_locs = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    fd, tmp_data = tempfile.mkstemp(prefix=f".{location}.", dir=directory)
    os.close(fd)
    fd, tmp_graph = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    os.close(fd)
    groups = sibling_groups(model, targets)
    group_of = {w: g for g in groups for w in g}
    by_name = {t.name: t for t in model.graph.initializer}

    def clip_of(src, lin):
        clip = None if lin.head or not clips else clips.get(src.sha256())
        result.clipped += clip is not None
        return clip

    def count(lins, t, q_t, s_t):
        """The layers behind one stored weight (a fused group: several) and their bytes before and after."""
        result.layers += len(lins)
        result.matmuls += 1
        result.lm_head = result.lm_head or any(li.head for li in lins)
        item = np.dtype(np.uint16 if t.data_type in (10, 16) else np.float32).itemsize
        result.bytes_before += sum(li.k * li.n for li in lins) * item
        result.bytes_after += sum(int(e.value) for x in (q_t, s_t) for e in x.external_data if e.key == "length")

    try:
        out, inits, dq = _Data(Path(tmp_data), location), [], []
        try:
            for t in model.graph.initializer:
                src = _Tensor(directory, t)
                lin = targets.get(t.name)
                g = group_of.get(t.name)
                if g is not None:
                    if t.name != g[0]:
                        continue  # written with the group's first weight
                    srcs = [_Tensor(directory, by_name[w]) for w in g]
                    lins = [targets[w] for w in g]
                    q_t, s_t, node = _quantize_fused(f"{g[0]}.fused", srcs, lins, dtype, group, out,
                                                     [clip_of(x, li) for x, li in zip(srcs, lins)])
                    inits += [q_t, s_t]
                    dq.append(node)
                    count(lins, t, q_t, s_t)
                elif lin is not None:
                    q_t, s_t, node = _quantize_linear(src, lin, "int8" if lin.head else dtype, None if lin.head else group,
                                                      out, clip_of(src, lin))
                    inits += [q_t, s_t]
                    dq.append(node)
                    count([lin], t, q_t, s_t)
                elif src.external:
                    offset = src.copy_to(out)
                    inits.append(out.tensor(t.name, t.data_type, t.dims, offset))
                else:
                    inits.append(t)
        finally:
            out.f.close()
        result.data_bytes_after = out.pos
        graph = model.graph
        nodes, sizes = _fuse_matmuls(list(graph.node), groups, targets)
        del graph.initializer[:]
        graph.initializer.extend(inits + sizes)
        del graph.node[:]
        graph.node.extend(dq + nodes)
        if result.opset != _opset(model):
            for o in model.opset_import:
                if o.domain in ("", "ai.onnx"):
                    o.version = result.opset
            model.ir_version = max(model.ir_version, INT4_IR_VERSION)
        onnx.save_model(model, tmp_graph)
        mode = path.stat().st_mode & 0o777  # mkstemp makes 0600 files; keep the exported graph's permissions
        os.chmod(tmp_data, mode)
        os.chmod(tmp_graph, mode)
        os.replace(tmp_data, directory / location)
        os.replace(tmp_graph, path)
    except BaseException:
        Path(tmp_data).unlink(missing_ok=True)
        Path(tmp_graph).unlink(missing_ok=True)
        raise
    for loc in old_locs - {location}:
        (directory / loc).unlink(missing_ok=True)
    onnx.checker.check_model(str(path), full_check=False)


# -- ONNX Runtime's fast path ----------------------------------------------------------------------
def fast_path(path: Path) -> dict:
    """Open the graph in ONNX Runtime (CPU, the runtime's optimization level) and read back the optimized
    graph: {"matmulnbits": {bits: count}, "block_sizes": {bits: [MatMulNBits block sizes]}, "unfused":
    [DequantizeLinear nodes still dequantizing an int weight initializer], "ops": {op: count}}. A quantized
    MatMul that ORT did not fuse shows in `unfused`."""
    import collections

    import onnx
    import onnxruntime as ort
    from onnx import helper

    from vtc.runtime.backend import quantized_weights_options

    with tempfile.TemporaryDirectory(prefix="vtc-ortopt-") as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        so.optimized_model_filepath = str(Path(d) / "opt.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        quantized_weights_options(so)
        # the runtime's session (vtc.runtime.backend.OrtSession) disables ClipQuantRewrite: so does this
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=["ClipQuantRewrite"])
        m = onnx.load(str(Path(d) / "opt.onnx"), load_external_data=False)
    int_inits = {t.name for t in m.graph.initializer if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.INT8)}
    bits, blocks = collections.Counter(), collections.defaultdict(set)
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            bits[a["bits"]] += 1
            blocks[a["bits"]].add(a["block_size"])
    unfused = [n.name for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int_inits]
    return {"matmulnbits": dict(bits), "block_sizes": {b: sorted(v) for b, v in blocks.items()}, "unfused": unfused,
            "ops": dict(collections.Counter(n.op_type for n in m.graph.node))}


# -- the build's hooks (vtc.export.build) ----------------------------------------------------------
AWQ_MARK = "_vtc_awq"  # set on the torch model by vtc.calibration.awq.apply: the scales were folded in
CLIP_MARK = "_vtc_awq_clips"  # and its clipping thresholds {sha256 of W^T as stored: [K/g, N]}, for this pass


def prepare(bp, step) -> dict:
    """Before export: the model checks, then for --weights-algo awq the AWQ scale search folded into the
    torch model (vtc.calibration.awq). Returns the AWQ summary ({} for rtn / fp)."""
    check_model(bp)
    if bp.args.weights == "fp" or bp.args.weights_algo != "awq":
        return {}
    from vtc.calibration import awq

    return awq.apply_to_build(bp, step)


def quantize_step(tmp: Path, bp, graphs: dict, step) -> WeightsRecord | None:
    """After export: quantize every LLM graph in place; the manifest's record (None for --weights fp)."""
    args = bp.args
    if args.weights == "fp":
        return None
    check_model(bp)
    awq_done = getattr(bp.model, AWQ_MARK, None)
    if args.weights_algo == "awq" and awq_done is None:
        raise ExportError("--weights-algo awq: the AWQ scales were not folded into the model before export.",
                          "vtc.export.build must call wquant.prepare(bp, step) before the graphs are exported.")
    from vtc.export.lint import weight_only_min_tensorrt

    rec = WeightsRecord(dtype=args.weights, group_size=args.group_size if args.weights == "int4" else None,
                        algo=args.weights_algo, min_tensorrt=weight_only_min_tensorrt(args.weights),
                        awq=dict(awq_done or {}))
    for name, (first, end) in segments(bp).items():
        how = f"blocks of {args.group_size}" if args.weights == "int4" else "per channel"
        with step(f"quantizing {name} weights to {args.weights} ({how}, {args.weights_algo})"):
            rec.add(name, quantize_graph(tmp / graphs[name].file, args.weights, args.group_size, lm_head=head_int8(args),
                                         expect=expected_linears(bp, first, end), clips=getattr(bp.model, CLIP_MARK, None)))
    if head_int8(args) and not rec.lm_head:
        raise ExportError("--lm-head int8: no LM head MatMul (a 2-D float initializer feeding the logits) was found in "
                          "the LLM graphs.", "Build with --lm-head fp, and please report it with the model config.")
    return rec


def head_int8(args) -> bool:
    """Whether the LM head becomes int8: with --weights int8|int4 unless --lm-head fp."""
    return args.weights != "fp" and (getattr(args, "lm_head", None) or "int8") == "int8"


def fake_quantize(bp) -> None:
    """Replace the torch model's decoder linear weights by exactly what the quantized graph computes with
    (q * s, vtc.calibration.awq's torch quantizers): HF's own modeling code on these weights is the
    reference a quantized artifact is held to (measured: logits within 1e-6 with ONNX Runtime's
    MatMulNBits at accuracy_level 0/1; its default level 4 quantizes activations to int8 as well)."""
    import torch

    from vtc.calibration.awq import pseudo_quantize, pseudo_quantize_int8, weight_key

    args = bp.args
    clips = getattr(bp.model, CLIP_MARK, None) or {}
    with torch.no_grad():
        for layer in bp.adapter.static_cache_lm(bp.model).decoder.layers:
            for lin in _llama_linears(layer).values():
                w = lin.weight.data
                if args.weights == "int8":
                    lin.weight.data = pseudo_quantize_int8(w)
                    continue
                clip = clips.get(weight_key(w))
                lin.weight.data = pseudo_quantize(w, args.group_size, None if clip is None else torch.from_numpy(clip).t())
        if head_int8(args):  # a new Parameter: a head tied to the embeddings must leave the embeddings as they are
            head = bp.adapter.static_cache_lm(bp.model).lm_head
            head.weight = torch.nn.Parameter(pseudo_quantize_int8(head.weight.data), requires_grad=False)


def accuracy(vlm, bp) -> dict:
    """The artifact (quantized weights, opened as `vlm`) against the eager PyTorch model with float weights
    on held-out pairs: vtc.export.kvquant.accuracy's measurement (logits cosine per step, greedy agreement)."""
    from vtc.export.kvquant import accuracy as measure

    report = measure(vlm, bp)
    report["reference"] = "eager PyTorch with float weights (AWQ-scaled when algo is awq), float32 KV, same compression"
    return report
