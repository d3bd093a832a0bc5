"""The static KV cache: one preallocated buffer the runtime owns; graphs only ever see views of it.

    buffer [L, 2, 1, Hkv, M, Dh]    (layer, key|value, batch, kv head, position, head dim)

Each layer keeps its own valid length (`lengths` [L]); entries at or beyond it are masked in the
graph. A step writes only the new tokens' K/V (the graph's `present_*` outputs, [1, Hkv, S, Dh]) at
`lengths[i]`; the cache is never copied, rewritten or re-quantized as a whole.
"""

from __future__ import annotations

import numpy as np

from vtc.runtime.errors import InputError


class StaticKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_len: int, dtype="float32"):
        self.max_len = max_len
        self.buffer = np.zeros((num_layers, 2, 1, num_kv_heads, max_len, head_dim), dtype=dtype)
        self.lengths = np.zeros(num_layers, dtype=np.int64)  # [L]
        empty = np.zeros((1, num_kv_heads, 0, head_dim), dtype=dtype)
        # The same view objects every step, so backends can bind them once (zero-copy).
        self._prefill_feeds, self._decode_feeds = {}, {}
        for i in range(num_layers):
            for j, kind in enumerate(("key", "value")):
                self._prefill_feeds[f"past_{kind}.{i}"] = empty
                self._decode_feeds[f"past_{kind}.{i}"] = self.buffer[i, j]

    @property
    def num_layers(self) -> int:
        return self.buffer.shape[0]

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def bytes_used(self) -> int:
        per_pos = self.buffer[0, 0, 0, :, 0, :].nbytes  # one layer, one of K/V, one position
        return int(2 * per_pos * self.lengths.sum())

    def reset(self) -> None:
        self.lengths[:] = 0

    def past_feeds(self, empty: bool) -> dict[str, np.ndarray]:
        """{past_key.i, past_value.i}: zero-length at prefill, full-length views at decode."""
        return self._prefill_feeds if empty else self._decode_feeds

    def write(self, presents: list[np.ndarray]) -> None:
        """presents = [key.0, value.0, key.1, ...], each [1, Hkv, S, Dh]: append at each layer's length."""
        seq = presents[0].shape[2]
        if int(self.lengths.max()) + seq > self.max_len:
            raise InputError(f"the KV cache is full ({self.max_len} positions).",
                             "Ask for fewer new tokens, or rebuild with a larger --max-seq-len.")
        for i in range(self.num_layers):
            start = int(self.lengths[i])
            self.buffer[i, 0, :, :, start:start + seq] = presents[2 * i]
            self.buffer[i, 1, :, :, start:start + seq] = presents[2 * i + 1]
        self.lengths += seq
