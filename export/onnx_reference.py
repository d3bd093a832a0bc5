"""A checking backend: the artifact's graphs run by ONNX's own reference evaluator (numpy, every dtype).

ONNX Runtime's CPU kernels have no bfloat16 (a bf16 graph fails at session creation), so a `--dtype bf16`
build cannot be checked with it on a CPU host. `onnx.reference.ReferenceEvaluator` runs any standard
ONNX graph op by op in numpy, bfloat16 included (through ml_dtypes): slow, but exact to the ONNX
semantics, and enough to check the exported math of a model against PyTorch where no GPU runtime is
present. The build uses it for the parity check of graphs ONNX Runtime cannot run (`needs_reference`);
it implements the runtime's backend interface (vtc.runtime.backend), so the check runs the normal
`VLM` path. It is a verification tool, not a deployment backend.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from vtc.runtime.backend import GraphSession

ORT_CPU_UNSUPPORTED = ("bfloat16",)  # graph dtypes ONNX Runtime's CPU provider has no kernels for


def needs_reference(graph_dtype: str) -> bool:
    return graph_dtype in ORT_CPU_UNSUPPORTED


class ReferenceSession(GraphSession):
    def __init__(self, path: Path, spec):
        super().__init__(spec)
        import onnx
        from onnx.reference import ReferenceEvaluator

        self.evaluator = ReferenceEvaluator(onnx.load(str(path)))  # external data loaded from beside the file

    def run_impl(self, feeds):
        t0 = time.perf_counter()
        outs = self.evaluator.run(self.output_names, {k: np.asarray(v) for k, v in feeds.items()})
        self.seconds += time.perf_counter() - t0
        return [np.asarray(o) for o in outs]


class OnnxReferenceBackend:
    name = "onnx-reference"

    def open(self, artifact_dir: Path, spec) -> GraphSession:
        return ReferenceSession(Path(artifact_dir) / spec.file, spec)

    def describe(self) -> dict:
        import onnx

        return {"backend": self.name, "version": onnx.__version__, "provider": "numpy", "threads": 1}
