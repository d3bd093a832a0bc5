"""The TensorRT runtime backend: the artifact's engines behind the same GraphSession interface as ONNX Runtime.

No torch: TensorRT's Python API for the engines, cuda-python (the CUDA runtime C API,
`cuda.bindings.runtime`, formerly `cuda.cudart`) for device memory, the stream and timing events. Both
are imported lazily; a missing one is a BackendError that says what to install.

Per graph (`TrtSession`):
  engine      deserialized from the manifest's `engines.graphs[name].file`, refused unless it was built by
              this TensorRT version for this GPU's compute capability (the message says how to rebuild)
  contexts    one execution context per optimization profile (llm: 0 = prefill, 1 = decode), so switching
              between prefill and decode never re-selects a profile; `run` picks the profile whose
              [min, max] shapes hold the feeds
  buffers     one device buffer per I/O tensor, sized for its largest profile shape, allocated once
  KV cache    past_key.i / past_value.i [1, Hkv, M, Dh] live on the device for the whole generation. The
              host cache (vtc.runtime.kv_cache) stays the source of truth; a decode step uploads only the
              positions written since the last step, [synced, past_lengths[i]) -- normally the one new
              token -- and a prefill call (past_seq = 0) marks this graph's layers as unsynced (a new prompt;
              TokenCarve compacts layers < W right after llm_pre's prefill). A feed array other than the
              one seen last time is uploaded whole. Entries >= past_lengths are masked in the graph.
  timing      `seconds` = wall time of copies + enqueue + sync (comparable with ONNX Runtime's);
              `gpu_seconds` = the engine's own execution between two CUDA events
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vtc.runtime.backend import GraphSession
from vtc.runtime.errors import ArtifactError, BackendError
from vtc.runtime.manifest import GraphSpec

INSTALL_TRT = ("Install TensorRT 10.x (x86_64/SBSA: pip install tensorrt-cu12; Jetson: it comes with JetPack, "
               "sudo apt install python3-libnvinfer), or use --backend onnxruntime.")
INSTALL_CUDA = "Install cuda-python: pip install cuda-python (its major version must match the CUDA driver's)."
KV_INPUT = re.compile(r"past_(key|value)\.(\d+)$")


# -- lazy imports ----------------------------------------------------------------------------------
def import_tensorrt(what: str = "the TensorRT backend needs TensorRT, which is not importable here",
                    fix: str = INSTALL_TRT):
    """The tensorrt module, or a BackendError "{what} ({the import error})." with `fix`. vtc's one check
    for a missing TensorRT (vtc.export.tensorrt.require_tensorrt words it for the engine build)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: Python bindings present, libnvinfer missing
        raise BackendError(f"{what} ({e}).", fix) from e
    return trt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise BackendError(f"the TensorRT backend needs cuda-python, which is not installed ({e}).",
                               INSTALL_CUDA) from e
    return cudart


def cuda_call(result, what: str):
    """cuda-python returns (cudaError_t, value...): raise on an error, return the value(s)."""
    cudart = import_cudart()
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise BackendError(f"CUDA call {what} failed: {name}.", "Check the GPU and driver (nvidia-smi / tegrastats).")
    return rest[0] if len(rest) == 1 else (rest or None)


# -- the device ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "8.7"
    total_memory: int


def device_info(device: int = 0) -> DeviceInfo:
    cudart = import_cudart()
    cuda_call(cudart.cudaSetDevice(device), "cudaSetDevice")
    prop = cuda_call(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(name=name.rstrip("\x00"), compute_capability=f"{prop.major}.{prop.minor}",
                      total_memory=int(prop.totalGlobalMem))


def check_engines(engines, trt_version: str, device: DeviceInfo) -> None:
    """Engines run only on the TensorRT version and GPU architecture they were built for."""
    if engines is None:
        raise ArtifactError("this artifact has no TensorRT engines.",
                            "Build them on this device: vtc-export engine DIR (or run with --backend onnxruntime).")
    if _release(engines.tensorrt_version) != _release(trt_version):
        raise BackendError(f"the engines were built with TensorRT {engines.tensorrt_version}; this is TensorRT "
                           f"{trt_version}.", "Rebuild them here: vtc-export engine DIR.")
    if engines.compute_capability != device.compute_capability:
        raise BackendError(f"the engines were built for compute capability {engines.compute_capability} "
                           f"({engines.device}); this GPU ({device.name}) is {device.compute_capability}.",
                           "Rebuild them on this device: vtc-export engine DIR.")


def _release(version: str) -> tuple[str, ...]:
    """major.minor.patch: engines are tied to a TensorRT release, not to a packaging build number."""
    return tuple(str(version).split(".")[:3])


class DeviceBuffer:
    """cudaMalloc'd memory, zero-filled (masked KV entries must be finite: 0 * NaN is NaN)."""

    def __init__(self, nbytes: int, stream):
        cudart = import_cudart()
        self.nbytes = max(int(nbytes), 1)
        self.ptr = cuda_call(cudart.cudaMalloc(self.nbytes), "cudaMalloc")
        cuda_call(cudart.cudaMemsetAsync(self.ptr, 0, self.nbytes, stream), "cudaMemsetAsync")

    def free(self) -> None:
        if self.ptr is not None:
            cuda_call(import_cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = None


# -- one graph -------------------------------------------------------------------------------------
def _numpy_dtype(trt, dtype) -> np.dtype:
    fp8 = getattr(trt.DataType, "FP8", None)
    if fp8 is not None and dtype == fp8:
        return np.dtype(np.uint8)  # numpy has no float8: the runtime holds fp8 caches as bytes
    return np.dtype(trt.nptype(dtype))


class KVSync:
    """Which positions of each past_* input must go to the device (see the module doc, "KV cache").

    The device copy of past_key.i / past_value.i is valid on [0, synced[i]). A prefill call (past_seq 0)
    starts a new prompt: nothing is valid. A decode call needs [0, past_lengths[i]): upload
    [synced, past_lengths) when the host array is the one fed last time, else everything."""

    def __init__(self, inputs: list[str], full: bool = False):
        found = {n: KV_INPUT.match(n) for n in inputs}
        self.layer = {n: int(m.group(2)) for n, m in found.items() if m}  # past_* input -> global layer id
        self.first = min(self.layer.values(), default=0)  # past_lengths[j] belongs to layer first + j
        self.full = full  # VTC_TRT_KV_SYNC=full: always upload the whole valid past (debugging)
        self.synced: dict[str, int] = {}
        self.last: dict[str, np.ndarray] = {}

    def span(self, name: str, feeds: dict) -> tuple[int, int] | None:
        """(start, stop) positions to upload for input `name`, or None; updates the bookkeeping."""
        array = feeds[name]  # [1, Hkv, P, Dh]
        if array.shape[2] == 0:
            self.synced = {}
            return None
        valid = int(feeds["past_lengths"][self.layer[name] - self.first])
        start = self.synced.get(name, 0)
        if self.full or array is not self.last.get(name) or valid < start:
            start = 0
        self.last[name], self.synced[name] = array, valid
        return (start, valid) if valid > start else None


class TrtSession(GraphSession):
    def __init__(self, engine_path: Path, spec: GraphSpec, shared: "TrtBackend"):
        super().__init__(spec)
        trt, self.cudart, self.stream, self.handle = shared.trt, shared.cudart, shared.stream, int(shared.stream)
        self.engine = shared.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {engine_path}.", "Rebuild it: vtc-export engine DIR.")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.dtypes = {n: _numpy_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.profiles = [self._profile_shapes(p) for p in range(self.engine.num_optimization_profiles)]
        self.contexts = [self._context(p) for p in range(len(self.profiles))]
        self.buffers = {n: DeviceBuffer(self._max_bytes(n), self.stream) for n in names}
        for ctx in self.contexts:
            for n in names:
                ctx.set_tensor_address(n, self.buffers[n].ptr)
        self.kv = KVSync(self.inputs, full=os.environ.get("VTC_TRT_KV_SYNC") == "full")
        self.gpu_seconds = 0.0
        self.events = [cuda_call(self.cudart.cudaEventCreate(), "cudaEventCreate") for _ in range(2)]

    def _profile_shapes(self, p: int) -> dict:
        """input -> (min, max) shapes of profile p."""
        out = {}
        for n in self.inputs:
            lo, _opt, hi = self.engine.get_tensor_profile_shape(n, p)
            out[n] = (tuple(lo), tuple(hi))
        return out

    def _context(self, p: int):
        ctx = self.engine.create_execution_context()
        ctx.set_optimization_profile_async(p, self.handle)
        cuda_call(self.cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        return ctx

    def _max_bytes(self, name: str) -> int:
        """Largest size of a tensor over all profiles (outputs: with every input at its max shape)."""
        best = 0
        for p, ctx in enumerate(self.contexts):
            if name in self.profiles[p]:
                shape = self.profiles[p][name][1]
            else:
                for n in self.inputs:
                    ctx.set_input_shape(n, self.profiles[p][n][1])
                shape = tuple(ctx.get_tensor_shape(name))
            best = max(best, int(np.prod(shape, dtype=np.int64)) * self.dtypes[name].itemsize)
        return best

    def _pick(self, feeds: dict) -> int:
        """The first profile whose [min, max] holds every feed's shape (llm: prefill, else decode)."""
        for p, shapes in enumerate(self.profiles):
            if all(all(lo <= s <= hi for s, lo, hi in zip(feeds[n].shape, *shapes[n])) for n in self.inputs):
                return p
        got = {n: list(feeds[n].shape) for n in self.inputs if n not in self.kv.layer}
        raise BackendError(f"{self.spec.file}: no optimization profile of the engine holds the shapes {got}.",
                           "The prompt is outside the built text budget or max sequence length: rebuild.")

    def run_impl(self, feeds):
        cudart = self.cudart
        t0 = time.perf_counter()
        ctx = self.contexts[self._pick(feeds)]
        for n in self.inputs:
            if not ctx.set_input_shape(n, feeds[n].shape):
                raise BackendError(f"{self.spec.file}: TensorRT refused shape {list(feeds[n].shape)} for {n}.",
                                   "This is a runtime/engine mismatch: rebuild the engines (vtc-export engine DIR).")
            array = np.ascontiguousarray(feeds[n], dtype=self.dtypes[n])
            if n in self.kv.layer:
                self._upload_kv(n, array, feeds)
            else:
                self._copy_h2d(self.buffers[n].ptr, array)
        cuda_call(cudart.cudaEventRecord(self.events[0], self.stream), "cudaEventRecord")
        if not ctx.execute_async_v3(self.handle):
            raise BackendError(f"TensorRT failed to run {self.spec.file}.", "Run `vtc-export compare` to locate it.")
        cuda_call(cudart.cudaEventRecord(self.events[1], self.stream), "cudaEventRecord")
        outs = [self._download(n, ctx) for n in self.output_names]
        cuda_call(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.gpu_seconds += cuda_call(cudart.cudaEventElapsedTime(*self.events), "cudaEventElapsedTime") / 1e3
        self.seconds += time.perf_counter() - t0
        return outs

    def _upload_kv(self, name: str, array: np.ndarray, feeds: dict) -> None:
        """past_* [1, Hkv, P, Dh]: positions [start, stop) of every head, as one strided 2-D copy."""
        span = self.kv.span(name, feeds)
        if span is None:
            return
        start, stop = span
        _, heads, m, dh = array.shape
        pitch, offset = m * dh * array.itemsize, start * dh * array.itemsize
        cuda_call(self.cudart.cudaMemcpy2DAsync(
            self.buffers[name].ptr + offset, pitch, array.ctypes.data + offset, pitch, (stop - start) * dh * array.itemsize,
            heads, self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream), "cudaMemcpy2DAsync")

    def _copy_h2d(self, dst: int, array: np.ndarray) -> None:
        if array.nbytes:
            cuda_call(self.cudart.cudaMemcpyAsync(dst, array.ctypes.data, array.nbytes,
                                                  self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream),
                      "cudaMemcpyAsync")

    def _download(self, name: str, ctx) -> np.ndarray:
        out = np.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.dtypes[name])
        if out.nbytes:
            cuda_call(self.cudart.cudaMemcpyAsync(out.ctypes.data, self.buffers[name].ptr, out.nbytes,
                                                  self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream),
                      "cudaMemcpyAsync")
        return out

    def close(self) -> None:
        for buf in self.buffers.values():
            buf.free()
        self.contexts, self.engine = [], None


# -- the backend -----------------------------------------------------------------------------------
class TrtBackend:
    """`get_backend("tensorrt")`: opens each graph's engine from the artifact's manifest."""

    name = "tensorrt"

    def __init__(self, device: int = 0):
        self.trt = import_tensorrt()
        self.cudart = import_cudart()
        self.device = device_info(device)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        self.stream = cuda_call(self.cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._manifests: dict[Path, object] = {}

    def _engines(self, artifact_dir: Path):
        from vtc.runtime import manifest as mf

        key = Path(artifact_dir).resolve()
        if key not in self._manifests:
            m = mf.load(key, check_files=False)  # the pipeline verified the files already
            check_engines(m.engines, self.trt.__version__, self.device)
            self._manifests[key] = m
        return self._manifests[key]

    def open(self, artifact_dir: Path, spec: GraphSpec):
        m = self._engines(artifact_dir)
        name = next((n for n, g in m.graphs.items() if g.file == spec.file), None)
        entry = m.engines.graphs.get(name) if name else None
        if entry is None:
            raise ArtifactError(f"the artifact's engines have none for graph {spec.file}.", "Rebuild them: vtc-export engine DIR.")
        return TrtSession(Path(artifact_dir) / entry["file"], spec, self)

    def describe(self) -> dict:
        return {"backend": self.name, "version": self.trt.__version__, "device": self.device.name,
                "compute_capability": self.device.compute_capability}
