"""The KV cache grows in capacity buckets, so decode reads what the context needs, not --max-seq-len
(vtc.runtime.kv_cache): growth keeps every filled entry, and generation across bucket boundaries still
equals the PyTorch reference token for token."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.images import random_image
from tests.helpers.parity import check_against_reference
from vtc.runtime.kv_cache import MIN_BUCKET, StaticKVCache, bucket


def test_buckets_are_powers_of_two_within_the_limits():
    assert [bucket(n, 1000) for n in (1, 64, 65, 128, 129, 600, 1000)] == [64, 64, 128, 128, 256, 1000, 1000]
    assert bucket(10, 32) == 32 and MIN_BUCKET == 64


def test_growth_keeps_the_filled_entries_and_rebinds_views():
    cache = StaticKVCache(num_layers=2, num_kv_heads=2, head_dim=4, max_len=300, dtypes=["float32", "int8"])
    rng = np.random.default_rng(0)
    written = []
    for step in range(5):
        seq = 50 if step == 0 else 30
        kv = [rng.integers(-100, 100, (1, 2, seq, 4)).astype(d) for d in ("float32", "float32", "int8", "int8")]
        before = cache.past_feeds(empty=False)["past_key.0"]
        cache.write(kv)
        written.append(kv)
        grew = cache.past_feeds(empty=False)["past_key.0"] is not before
        assert grew == (step in (1, 3))  # 50 -> 80 > 64 -> 128; 140 > 128 -> 256
    assert cache.capacity == 256 and list(cache.lengths) == [170, 170]
    for layer in range(2):
        for j in range(2):
            want = np.concatenate([kv[2 * layer + j] for kv in written], axis=2)
            assert np.array_equal(cache.layers[layer][j, :, :, :170], want)  # [1, Hkv, 170, Dh]
    with pytest.raises(Exception, match="KV cache is full"):
        cache.reserve(301)


@pytest.mark.parametrize("name,method,ratio,options", [("mha-default", "none", 1.0, {}),
                                                      ("mqa-layer-1", "fastv", 0.25, {})])
def test_generation_across_buckets_equals_the_reference(name, method, ratio, options, tiny_checkpoints,
                                                         artifact_factory):
    """80 new tokens after a ~85-token prompt cross 128 (and FastV's layers hold different lengths)."""
    art = artifact_factory(name, method, None if method == "none" else ratio,
                           **({} if method == "none" else {"method_options": options}))
    out = check_against_reference(art, tiny_checkpoints[name], method, ratio, random_image(3), options, new_tokens=80)
    assert out.vlm.cache.capacity == 256 and int(out.vlm.cache.lengths.max()) > 128
