"""One backend interface for the runtime; ONNX Runtime is its first implementation.

A backend opens the artifact's graphs as `GraphSession`s. A session's `run(feeds)` validates the
feed names against the manifest (`run`), then calls `run_impl` (Polygraphy's infer/infer_impl split).
Feeds are numpy arrays; the KV cache arrays are bound without copies (OrtValue shares their memory).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from vtc.runtime.errors import BackendError, InputError, UsageError
from vtc.runtime.manifest import GraphSpec

ONNX_FLOAT8E4M3FN = 17  # onnx.TensorProto.FLOAT8E4M3FN (the runtime does not import onnx)
# MatMulNBits' block size for weights quantized per output channel (build --weights int8, the int8 LM head).
# ONNX Runtime fuses DequantizeLinear + MatMul into MatMulNBits, whose weights are blocked along K; a
# per-channel weight is re-blocked with its one scale repeated per block, so any block size computes the same
# weight. ONNX Runtime's default re-blocks by 32 (one float32 scale per 32 int8 weights: 12.5% more bytes per
# decode step); -1 is its own heuristic: the largest power of two <= 256 that pads K least (the weights' K
# here: 1024 / 2816 / 4096 / 11008 -> 256). Measured on 2 cores (bench-size LLaVA int8, one decode step at
# 673 cache entries, interleaved): 11.9 ms at 32, 10.3 at 128, 9.9 at 256. With accuracy level 4 the
# activations are quantized to int8 per block, so the block also sets that granularity (see OrtBackend).
# Blocked (int4) weights keep their own --group-size. Unknown to older ONNX Runtimes, which ignore it.
PER_CHANNEL_BLOCK = "-1"


class GraphSession:
    """One loaded graph. Subclasses implement `run_impl`."""

    def __init__(self, spec: GraphSpec):
        self.spec = spec
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]
        self.calls = 0  # run() calls, and seconds inside the backend's own inference call (set by
        self.seconds = 0.0  # run_impl), so profilers can split runtime overhead from backend time

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        extra = [n for n in feeds if n not in self.input_names]
        if missing or extra:
            raise InputError(f"graph {self.spec.file}: missing inputs {missing}, unexpected inputs {extra}.",
                             "This is a runtime/artifact mismatch: rebuild the artifact with this vtc.")
        self.calls += 1
        return self.run_impl(feeds)

    def run_impl(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


_SHARED_POOL: list[int] = []  # [intra-op size] once this process's sessions run on one shared pool (0: ORT's default)


def shared_thread_pool(threads: int | None) -> None:
    """Run every ONNX Runtime session of this process on one shared pool of `threads` intra-op threads (None:
    ONNX Runtime's default); a second call must ask for the same size. The commands that own their process
    (`run`, `profile`, `eval`, `sweep`, the benches) call it; a library user may, before opening an artifact.

    Why: ONNX Runtime makes one thread pool per session by default, and an artifact runs 2-4 sessions in
    turn (vision, LLM, in-LLM segments). A pool's threads spin for a while after its session's run, so on a
    small CPU the next session competes with them. Measured on 2 cores (bench-size LLaVA, int4, pool 0.25):
    the vision graph took 83 ms right after a generation and 50 ms after a pause; TTFT p50 234 ms with
    per-session pools, 160-167 ms with one shared pool. The pool is ONNX Runtime's global thread pool: process
    wide, sized once, and once it exists ONNX Runtime refuses sessions with their own pools, which is why
    opening an artifact does not make it behind the caller's back."""
    n = threads or 0
    if _SHARED_POOL:
        if _SHARED_POOL[0] != n:
            raise UsageError(f"this process already runs ONNX Runtime on one shared pool of "
                             f"{_SHARED_POOL[0] or 'the default number of'} threads, and {n or 'the default'} were asked for.",
                             "Use one thread count per process (--threads / VTC_THREADS), or run in a new process.")
        return
    from onnxruntime.capi import _pybind_state

    try:
        _pybind_state.set_global_thread_pool_sizes(n, 1)
    except Exception as e:  # ONNX Runtime's global pools were made earlier in this process, not by vtc
        raise BackendError(f"ONNX Runtime's shared thread pool exists already in this process: {e}",
                           "Open vtc artifacts before making ONNX Runtime's global thread pools elsewhere.") from e
    _SHARED_POOL.append(n)


def check_block_size(block_size) -> str:
    """A MatMulNBits block size for per-channel weights as ONNX Runtime takes it: -1 (its least-padding choice),
    0 (its default, 32) or a power of two in [16, 256]. Checked here: ONNX Runtime refuses others only when a
    session opens, with an error that names neither the setting nor the fix."""
    try:
        n = int(block_size)
    except (TypeError, ValueError):
        n = None
    if n is None or not (n in (-1, 0) or (16 <= n <= 256 and n & (n - 1) == 0)):
        raise UsageError(f"MatMulNBits block size {block_size!r} is not one ONNX Runtime takes.",
                         "Use -1 (ONNX Runtime's least-padding choice, the default), 0 (its default 32) or a power "
                         "of two from 16 to 256.")
    return str(n)


def quantized_weights_options(opts, accuracy_level: int | None = None, block_size: str = PER_CHANNEL_BLOCK) -> None:
    """How ONNX Runtime runs quantized weights (MatMulNBits): `accuracy_level` (None: ORT's default, 4) and the
    block size for per-channel weights (PER_CHANNEL_BLOCK). The runtime's sessions and the build's fast-path
    check (vtc.export.wquant.fast_path) both take them from here."""
    if accuracy_level is not None:
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    opts.add_session_config_entry("session.qdq_matmulnbits_block_size", str(block_size))


class OrtSession(GraphSession):
    def __init__(self, path: Path, spec: GraphSpec, threads: int | None, provider: str = "cpu", spin: bool = True,
                 memory_arena: bool = True, matmul_accuracy_level: int | None = None,
                 matmul_block_size: str = PER_CHANNEL_BLOCK):
        super().__init__(spec)
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.enable_cpu_mem_arena = memory_arena  # see OrtBackend
        quantized_weights_options(opts, matmul_accuracy_level, matmul_block_size)
        if _SHARED_POOL:  # see shared_thread_pool; OrtBackend.open checked `threads` against its size
            opts.use_per_session_threads = False
        else:
            if threads:
                opts.intra_op_num_threads = threads
            if not spin:  # see OrtBackend.prepare
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
                opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        providers, self.fallback = ort_providers(ort, provider)
        if providers[0] == "CPUExecutionProvider" and any(t.dtype == "bfloat16" for t in spec.inputs):
            raise BackendError(f"{path.name} is a bfloat16 graph (build --dtype bf16), and ONNX Runtime's CPU provider "
                               "has no bfloat16 kernels.", "Run it with --backend tensorrt on a GPU, or rebuild with "
                               "--dtype fp16 (or fp32) for ONNX Runtime.")
        try:
            # ORT 1.31 + float8 Q/DQ (the fp8 KV cache): ClipQuantRewrite rejects a float8 zero point, and the
            # extended-level QDQ transformers move Transposes in front of DequantizeLinear onto float8 tensors,
            # which have no CPU Transpose kernel. Such graphs run with basic optimizations (FP8 is a TensorRT /
            # SM 8.9+ feature; on CPU it runs for verification).
            # QDQS8ToU8Transformer: with opset 21 (int4 weights) and an int8 KV cache it rewrites the cache's int8
            # QuantizeLinear to a uint8 one whose zero point no longer matches (session creation fails).
            disabled = ["ClipQuantRewrite", "QDQS8ToU8Transformer"]
            if any(t.dtype == "float8_e4m3fn" for t in spec.inputs):
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            self.session = ort.InferenceSession(str(path), opts, providers=providers, disabled_optimizers=disabled)
        except Exception as e:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph, ...)
            raise BackendError(f"ONNX Runtime could not load {path}: {e}", "Rebuild the artifact.") from e
        active = self.session.get_providers()[0]
        if self.fallback is None and active != providers[0]:  # e.g. CUDA libraries missing at session creation
            self.fallback = f"ONNX Runtime could not start {providers[0]} (see its log); running on {active}."
        self._ortvalue = ort.OrtValue.ortvalue_from_numpy
        # float8 inputs arrive as uint8 bytes (numpy has no float8): bind them with their ONNX type.
        self._onnx_type = {t.name: ONNX_FLOAT8E4M3FN for t in spec.inputs if t.dtype == "float8_e4m3fn"}
        self._typed = ort.OrtValue.ortvalue_from_numpy_with_onnx_type
        self._bound: dict[str, tuple[np.ndarray, object]] = {}  # name -> (array, OrtValue sharing its memory)

    def _value(self, name: str, array: np.ndarray):
        """OrtValue for a feed; reused while the same array object is fed again (the KV cache views)."""
        hit = self._bound.get(name)
        if hit is not None and hit[0] is array:
            return hit[1]
        if name in self._onnx_type:
            value = self._typed(np.ascontiguousarray(array), onnx_element_type=self._onnx_type[name])
        else:
            value = self._ortvalue(np.ascontiguousarray(array))
        if array.flags.c_contiguous:
            self._bound[name] = (array, value)
        return value

    def run_impl(self, feeds):
        values = {k: self._value(k, v) for k, v in feeds.items()}
        t0 = time.perf_counter()
        outs = self.session.run_with_ort_values(self.output_names, values)
        self.seconds += time.perf_counter() - t0
        return [o.numpy() for o in outs]


ORT_PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


def ort_providers(ort, provider: str) -> tuple[list[str], str | None]:
    """ONNX Runtime's provider list for --provider, and the reason it falls back (None when it does not)."""
    chain = ORT_PROVIDERS.get(provider)
    if chain is None:
        raise BackendError(f"--provider {provider!r} is not one of {', '.join(ORT_PROVIDERS)}.",
                           "Pass --provider cpu, cuda or tensorrt.")
    available = ort.get_available_providers()
    usable = [p for p in chain if p in available] or ["CPUExecutionProvider"]
    if usable[0] == chain[0]:
        return usable, None
    return usable, (f"{chain[0]} is not available in this onnxruntime {ort.__version__} (it has "
                    f"{', '.join(available)}), so the graphs run on {usable[0]}: install onnxruntime-gpu"
                    + (" and TensorRT" if provider == "tensorrt" else "") + " for the GPU.")


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads, source: str = "--threads") -> int | None:
    """ONNX Runtime intra-op threads: None or 0 = ONNX Runtime's default (None), else 1..usable_cores().
    More threads than cores only slows inference down (and 10^5 of them exhaust the host): a UsageError."""
    if threads is None:
        return None
    try:
        n = int(threads) if not isinstance(threads, (bool, float)) else None
    except (TypeError, ValueError):
        n = None
    cores = usable_cores()
    if n is None or not 0 <= n <= cores:
        raise UsageError(f"{source} {threads!r} is not a thread count for this machine: it has {cores} usable "
                         f"core{'s' if cores != 1 else ''}.",
                         f"Set {source} to 1..{cores}, or unset it." if source == "VTC_THREADS" else
                         f"Pass 1 to {cores}, or 0 for ONNX Runtime's default.")
    return n or None


def env_threads() -> int | None:
    """The VTC_THREADS environment variable, checked like --threads (unset or empty: None)."""
    value = os.environ.get("VTC_THREADS", "").strip()
    return check_threads(value, "VTC_THREADS") if value else None


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, threads: int | None = None, provider: str = "cpu", memory_arena: bool = True,
                 matmul_accuracy_level: int | None = None, matmul_block_size: str = PER_CHANNEL_BLOCK):
        """`memory_arena=False`: activations are freed after each run instead of kept in ONNX Runtime's CPU
        arena (which grows in power-of-two chunks): the memory-lean build's check, whose peak counts.
        `matmul_accuracy_level`: MatMulNBits' compute type for quantized weights (None: ORT's default, which
        quantizes activations to int8 where the CPU has VNNI; 1: float32, the build's parity check).
        `matmul_block_size`: MatMulNBits' block for per-channel int8 weights (PER_CHANNEL_BLOCK; "0" is ORT's 32)."""
        self.asked = check_threads(threads)  # given explicitly (VTC_THREADS is only a default)
        self.threads = self.asked or env_threads()
        self.provider = provider
        self.memory_arena = memory_arena
        self.matmul_accuracy_level = matmul_accuracy_level
        self.matmul_block_size = check_block_size(matmul_block_size)
        self.fallback: str | None = None  # why a session runs on another provider than asked
        self.spin = True

    def prepare(self, manifest) -> None:
        """Per-artifact session settings. Where the process has no shared pool (`shared_thread_pool`), each
        session gets its own; then an LLM split into segments (in-LLM methods), which runs two sessions per
        decode step, turns spinning off, because each session's threads spin after their work and starve the
        other's on a small CPU (measured on 2 cores: 33 vs 18.5 ms/token); a single LLM graph keeps spinning
        (16.6 vs 21.3 ms/token without). The shared pool spins, whatever the artifact."""
        self.spin = "llm" in manifest.graphs

    def open(self, artifact_dir: Path, spec: GraphSpec) -> GraphSession:
        if _SHARED_POOL and self.asked:
            shared_thread_pool(self.asked)  # the same size as the shared pool, or a UsageError
        session = OrtSession(Path(artifact_dir) / spec.file, spec, self.threads, self.provider, self.spin,
                             self.memory_arena, self.matmul_accuracy_level, self.matmul_block_size)
        self.fallback = self.fallback or session.fallback
        return session

    def describe(self) -> dict:
        import onnxruntime as ort

        shared = bool(_SHARED_POOL)
        threads = (_SHARED_POOL[0] if shared else self.threads) or "default"
        return {"backend": self.name, "version": ort.__version__, "provider": self.provider, "threads": threads,
                "thread_pool": "shared" if shared else "per-session",
                **({"fallback": self.fallback} if self.fallback else {})}


def get_backend(name: str = "onnxruntime", threads: int | None = None, provider: str = "cpu", **kwargs):
    """The runtime backend `name` (`run --backend/--threads/--provider`): onnxruntime with `threads` intra-op
    threads on ONNX Runtime's execution `provider` (its `fallback` says why it left the one asked for), or
    tensorrt: the artifact's engines, which have neither threads nor providers (threads is checked, then ignored)."""
    check_threads(threads)
    if name in ("onnxruntime", "ort"):
        return OrtBackend(threads=threads, provider=provider, **kwargs)
    if name == "tensorrt":
        if provider not in (None, "cpu"):
            raise UsageError("--provider selects ONNX Runtime's execution provider.", "Drop it with --backend tensorrt.")
        from vtc.runtime.trt_backend import TrtBackend

        return TrtBackend(**kwargs)
    raise BackendError(f"unknown runtime backend {name!r}.", "Available: onnxruntime, tensorrt.")
