"""The view of an ONNX graph that `vtc.export.lint` checks, and a small evaluator of shape arithmetic.

GraphView: nodes, producers/consumers, element types and (symbolic) shapes after ONNX shape inference,
and the values of initializers and Constant outputs (None where the data is external: graphs are
loaded without their weights). ShapeEvaluator: the value of a small integer tensor (TopK's K)
computed from constants and input shapes under a binding of the symbolic dims ({"seq": 113}).
"""

from __future__ import annotations

import ast
import operator

import numpy as np

ONNX_TYPE = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING",
             9: "BOOL", 10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128",
             16: "BF16", 17: "FP8", 18: "FP8E4M3FNUZ", 19: "FP8E5M2", 20: "FP8E5M2FNUZ", 21: "UINT4", 22: "INT4"}


SMALL = 4096  # initializers up to this many elements are read (K, axes, zero points); weights are not


class GraphView:
    def __init__(self, model):
        import onnx
        from onnx import numpy_helper

        self.model = model
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError):
            inferred = model  # lint falls back to the types and shapes the exporter recorded
        self.nodes = list(model.graph.node)
        self.inputs = {v.name for v in model.graph.input}
        self.outputs = {v.name for v in model.graph.output}
        self.types: dict[str, str] = {}
        self.shapes: dict[str, list] = {}
        for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
            t = v.type.tensor_type
            self.types[v.name] = ONNX_TYPE.get(t.elem_type, f"type {t.elem_type}")
            if t.HasField("shape"):
                self.shapes[v.name] = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else None)
                                       for d in t.shape.dim]
        self.consts: dict[str, np.ndarray | None] = {}  # initializers, Constant outputs; None: value not read
        for init in model.graph.initializer:
            self.types[init.name] = ONNX_TYPE.get(init.data_type, f"type {init.data_type}")
            self.shapes[init.name] = list(init.dims)
            small = init.data_location != onnx.TensorProto.EXTERNAL and int(np.prod(init.dims)) <= SMALL
            self.consts[init.name] = numpy_helper.to_array(init) if small else None  # weights are never read
        self.producer: dict[str, object] = {}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for o in n.output:
                self.producer[o] = n
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
            if n.op_type == "Constant" and n.output:
                self.consts[n.output[0]] = _constant_value(n)

    def attr(self, node, name: str, default=None):
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def is_constant(self, name: str) -> bool:
        """An initializer or a Constant's output (through Identity): what the parser imports as weights."""
        while name not in self.consts:
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity":
                return False
            name = node.input[0]
        return True

    def const(self, name: str):
        while name not in self.consts and name in self.producer and self.producer[name].op_type == "Identity":
            name = self.producer[name].input[0]
        return self.consts.get(name)


def _constant_value(node):
    from onnx import helper, numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name in ("value_int", "value_float"):
            return np.array(helper.get_attribute_value(a))
        if a.name in ("value_ints", "value_floats"):
            return np.array(helper.get_attribute_value(a))
    return None


# -- a small evaluator for shape arithmetic (TopK's K) ---------------------------------------------
_ELEMENTWISE = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.floor_divide, "Min": np.minimum,
                "Max": np.maximum, "Neg": np.negative, "Abs": np.abs}
_SYM_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


class ShapeEvaluator:
    """Values of small integer tensors computed from constants and input shapes, under a binding of
    the symbolic dims. `used_shapes`: the value depends on an input shape; `data_dependent`: on values."""

    def __init__(self, g: GraphView):
        self.g = g
        self.used_shapes = False
        self.data_dependent = False

    def value(self, name: str, env: dict):
        g = self.g
        if name in g.consts:
            return g.consts[name]
        if name in g.inputs:
            self.data_dependent = True
            return None
        n = g.producer.get(name)
        if n is None:
            return None
        if n.op_type == "Shape":
            self.used_shapes = True
            dims = self.shape(n.input[0], env)
            if dims is None or any(d is None for d in dims):
                return None
            start, end = g.attr(n, "start", 0), g.attr(n, "end", len(dims))
            return np.array(dims[start:end], dtype=np.int64)
        args = [self.value(i, env) if i else None for i in n.input]
        return _apply(g, n, args)

    def shape(self, name: str, env: dict):
        g = self.g
        dims = g.shapes.get(name)
        if dims is not None:
            resolved = [_dim(d, env) for d in dims]
            if all(d is not None for d in resolved):
                return resolved
        n = g.producer.get(name)
        if n is not None and n.op_type == "TopK":  # outputs: the input's shape with K along the axis
            base = self.shape(n.input[0], env)
            k = self.value(n.input[1], env)
            if base is None or k is None:
                return None
            axis = g.attr(n, "axis", -1)
            base = list(base)
            base[axis] = int(np.max(k))
            return base
        return None if dims is None else [_dim(d, env) for d in dims]


def _dim(d, env: dict):
    """A dim: int, or a symbolic expression over the bound names ('seq - 48', 'past_seq + seq')."""
    if isinstance(d, int):
        return d
    if d is None or d == "":
        return None
    try:
        return _sym(ast.parse(d, mode="eval").body, env)
    except (SyntaxError, KeyError, TypeError):
        return None


def _sym(node, env):
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        value = env[node.id]
        if not isinstance(value, int):
            raise TypeError(node.id)
        return value
    if isinstance(node, ast.BinOp) and type(node.op) in _SYM_OPS:
        return _SYM_OPS[type(node.op)](_sym(node.left, env), _sym(node.right, env))
    raise TypeError(ast.dump(node))


def _apply(g: GraphView, n, args: list):
    op = n.op_type
    if any(a is None for a in args[:1]):
        return None
    x = args[0]
    if op in ("Identity", "Cast"):
        return x
    if op in _ELEMENTWISE:
        if any(a is None for a in args):
            return None
        return _ELEMENTWISE[op](*args) if len(args) > 1 else _ELEMENTWISE[op](x)
    if op == "Squeeze":
        return np.squeeze(x, axis=tuple(int(a) for a in args[1])) if len(args) > 1 and args[1] is not None else np.squeeze(x)
    if op == "Unsqueeze":
        return np.expand_dims(x, tuple(int(a) for a in args[1])) if args[1] is not None else None
    if op == "Reshape":
        return None if args[1] is None else x.reshape([int(s) if s != 0 else x.shape[i] for i, s in enumerate(args[1])])
    if op == "Concat":
        return None if any(a is None for a in args) else np.concatenate(args, axis=g.attr(n, "axis", 0))
    if op == "Gather":
        return None if args[1] is None else np.take(x, args[1], axis=g.attr(n, "axis", 0))
    if op == "Slice":
        if any(a is None for a in args[1:3]):
            return None
        axes = args[3] if len(args) > 3 and args[3] is not None else range(len(args[1]))
        steps = args[4] if len(args) > 4 and args[4] is not None else [1] * len(args[1])
        idx = [slice(None)] * x.ndim
        for a, s, e, st in zip(axes, args[1], args[2], steps):
            idx[int(a)] = slice(int(s), int(e), int(st))
        return x[tuple(idx)]
    return None
