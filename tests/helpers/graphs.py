"""Checks on exported ONNX graphs: no data-dependent or scatter ops, sorted TopK."""

from __future__ import annotations

import onnx

FORBIDDEN_OPS = {"NonZero", "ScatterND", "ScatterElements", "Scatter", "Loop", "If"}


def vision_graph_ops(art) -> list:
    """The nodes of an artifact's vision.onnx (main graph only)."""
    return list(onnx.load(str(art / "vision.onnx"), load_external_data=False).graph.node)


def assert_static_friendly(nodes) -> None:
    """No data-dependent or scatter ops, no Loop; every TopK sorted=1."""
    assert not {n.op_type for n in nodes} & FORBIDDEN_OPS
    for n in nodes:
        if n.op_type == "TopK":
            attrs = {a.name: a.i for a in n.attribute}
            assert attrs.get("sorted", 1) == 1, n


def assert_static_graph(path) -> None:
    """The ONNX file at `path`, its functions included: no data-dependent or scatter ops; every TopK sorted."""
    graph = onnx.load(str(path), load_external_data=False)
    nodes = list(graph.graph.node) + [n for f in graph.functions for n in f.node]
    ops = {n.op_type for n in nodes}
    assert not ops & {"NonZero", "ScatterND", "ScatterElements", "Scatter"}, ops
    for n in nodes:
        if n.op_type == "TopK":
            assert all(a.i == 1 for a in n.attribute if a.name == "sorted")
