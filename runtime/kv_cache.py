"""The KV cache: buffers the runtime owns; graphs only ever see views of them.

    layers[i] [2, 1, Hkv, C, Dh]    (key|value, batch, kv head, position, head dim), one per layer, in
                                    that layer's storage dtype (float32, float16, bfloat16, int8;
                                    float8_e4m3fn is held as uint8 bytes, which numpy cannot name)

Each layer keeps its own valid length (`lengths` [L]); entries at or beyond it are masked in the
graph. A step writes only the new tokens' K/V (the graph's `present_*` outputs, [1, Hkv, S, Dh]) at
`lengths[i]`; the cache is never rewritten or re-quantized as a whole.

Capacity buckets: a decode step's attention reads the whole past it is fed, so the past is fed at the
current capacity C, not at max_seq_len: C is the smallest power of two >= the filled length (at least
MIN_BUCKET, at most max_seq_len), the same for every layer (the graphs share one `past_seq` dim).
When a write needs more, all layers grow to the next bucket: one copy of the filled part per doubling
(amortised O(1) per token), so a decode step costs what the context needs, within 2x, whatever
--max-seq-len the artifact was built with. TensorRT's decode profile covers [MIN_BUCKET, max_seq_len].

A generation's horizon: `VLM.generate` knows the most positions it can fill (prompt + max_new_tokens) and
passes it to `reset`; a bucket is then also capped at that horizon rounded up to MIN_BUCKET, so a 590-token
prompt with 32 new tokens decodes over 640 positions instead of 1024 (every step reads 37% less cache), and
the capacity is set at prefill, so no copy happens mid-generation unless the power-of-two bucket is the
smaller one. Without a horizon (the step-by-step API) the buckets are the powers of two.
"""

from __future__ import annotations

import numpy as np

from vtc.runtime.errors import ArtifactError, InputError

FP8 = "float8_e4m3fn"
BF16 = "bfloat16"


def storage_dtype(dtype: str) -> np.dtype:
    """numpy dtype that holds a tensor of `dtype` (float8_e4m3fn as raw uint8 bytes; bfloat16 as
    ml_dtypes.bfloat16, the numpy extension type ONNX uses too)."""
    if dtype == FP8:
        return np.dtype(np.uint8)
    if dtype == BF16:
        return bfloat16()
    return np.dtype(dtype)


def bfloat16() -> np.dtype:
    try:
        import ml_dtypes
    except ImportError as e:
        raise ArtifactError("this artifact holds bfloat16 tensors, which numpy needs ml_dtypes for.",
                            "pip install ml_dtypes") from e
    return np.dtype(ml_dtypes.bfloat16)


MIN_BUCKET = 64  # smallest decode capacity (positions); the build's decode profile starts here


def bucket(need: int, max_len: int, horizon: int | None = None) -> int:
    """The capacity for `need` filled positions: a power of two >= need, at least MIN_BUCKET, at most max_len,
    and at most `horizon` (the most this generation fills) rounded up to MIN_BUCKET, when need <= horizon."""
    c = MIN_BUCKET
    while c < need:
        c *= 2
    if horizon is not None and need <= horizon:
        c = min(c, -(-horizon // MIN_BUCKET) * MIN_BUCKET)
    return min(c, max_len)


class StaticKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtypes="float32"):
        self.max_len = max_len
        self.shape = (num_kv_heads, head_dim)
        dtypes = [dtypes] * num_layers if isinstance(dtypes, str) else list(dtypes)
        self.dtypes = [storage_dtype(d) for d in dtypes]
        self.lengths = np.zeros(num_layers, dtype=np.int64)  # [L]
        self.horizon: int | None = None  # the most positions the current generation fills (see `reset`)
        self._prefill_feeds = {}  # zero-length pasts, the same objects every prefill
        for i, dt in enumerate(self.dtypes):
            empty = np.zeros((1, num_kv_heads, 0, head_dim), dtype=dt)
            for kind in ("key", "value"):
                self._prefill_feeds[f"past_{kind}.{i}"] = empty
        self._allocate(bucket(1, max_len))

    def _allocate(self, capacity: int) -> None:
        """(Re)allocate every layer at `capacity`, keeping the filled entries; rebuilds the decode views
        (the same view objects until the next growth, so backends bind them once)."""
        hkv, dh = self.shape
        old = getattr(self, "layers", None)
        self.layers = [np.zeros((2, 1, hkv, capacity, dh), dtype=dt) for dt in self.dtypes]
        if old is not None:
            for i, (new, prev) in enumerate(zip(self.layers, old)):
                n = int(self.lengths[i])
                new[:, :, :, :n] = prev[:, :, :, :n]
        self.capacity = capacity
        self.allocations = getattr(self, "allocations", 0) + 1  # which buffers the decode views belong to
        self._decode_feeds = {f"past_{kind}.{i}": layer[j] for i, layer in enumerate(self.layers)
                              for j, kind in enumerate(("key", "value"))}

    def reserve(self, need: int) -> None:
        """Make room for `need` filled positions in every layer (grows to the next bucket)."""
        if need > self.max_len:
            raise InputError(f"the KV cache is full ({self.max_len} positions).",
                             "Ask for fewer new tokens, or rebuild with a larger --max-seq-len.")
        if need > self.capacity:
            self._allocate(bucket(need, self.max_len, self.horizon))
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def bytes_used(self) -> int:
        """Bytes of the valid entries (what the cache holds now), all layers."""
        return int(sum(layer[:, :, :, 0].nbytes * n for layer, n in zip(self.layers, self.lengths)))

    def reset(self, need: int | None = None, horizon: int | None = None) -> None:
        """A new prompt: nothing is filled. With `need` (the prompt's positions) the capacity becomes the
        bucket for it under `horizon` (the most positions this generation fills; None: unknown). The current
        buffers stay when they already hold that and are no larger than the prompt's power-of-two bucket, so
        requests that alternate between nearby horizons do not re-allocate (and re-fault) the cache each time,
        and no step reads more than it would without a horizon. Without `need` the capacity stays."""
        self.lengths[:] = 0
        self.horizon = horizon
        if need is not None:
            want = bucket(need, self.max_len, horizon)
            if not want <= self.capacity <= bucket(need, self.max_len):
                self._allocate(want)

    def past_feeds(self, empty: bool, layers: range | None = None) -> dict[str, np.ndarray]:
        """{past_key.i, past_value.i} for `layers` (default all): zero-length at prefill, full-length
        views at decode. The same view objects every call."""
        feeds = self._prefill_feeds if empty else self._decode_feeds
        if layers is None or len(layers) == self.num_layers:
            return feeds
        names = {f"past_{kind}.{i}" for i in layers for kind in ("key", "value")}
        return {k: v for k, v in feeds.items() if k in names}

    def write(self, presents: list[np.ndarray], first: int = 0) -> None:
        """presents = [key.f, value.f, key.f+1, ...], each [1, Hkv, S, Dh], for layers first.. :
        append at each layer's own length."""
        seq = presents[0].shape[2]
        layers = range(first, first + len(presents) // 2)
        self.reserve(int(self.lengths[first:layers.stop].max()) + seq)
        for j, i in enumerate(layers):
            start = int(self.lengths[i])
            self.layers[i][0, :, :, start:start + seq] = presents[2 * j]
            self.layers[i][1, :, :, start:start + seq] = presents[2 * j + 1]
        self.lengths[first:layers.stop] += seq

    def compact(self, layers: range, keep: np.ndarray) -> None:
        """Keep only entries `keep` [S'] (ascending) of `layers`, moved to the front. Once per prompt
        (TokenCarve trims the layers before its work layer); never on a decode step."""
        n = keep.shape[0]
        for i in layers:
            layer = self.layers[i]  # [2, 1, Hkv, M, Dh]
            layer[:, :, :, :n] = np.take(layer, keep, axis=3)
            self.lengths[i] = n
