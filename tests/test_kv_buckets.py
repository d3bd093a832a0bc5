"""The KV cache grows in capacity buckets, so decode reads what the context needs, not --max-seq-len
(vtc.runtime.kv_cache): growth keeps every filled entry, a generation's horizon (prompt + max_new_tokens)
caps the buckets, and generation across bucket boundaries still equals the PyTorch reference token for token."""

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
    prompt = out.prompt.num_text + max(out.vlm.manifest.compression.kv_visual_per_layer)  # positions at prefill
    horizon = prompt + 80  # generate_from sizes the cache for prompt + max_new_tokens (kv_cache's horizon)
    assert prompt <= 128 < horizon - 1  # prefill in the 128 bucket, decode grows past it ...
    assert out.vlm.cache.capacity == -(-horizon // MIN_BUCKET) * MIN_BUCKET < 256  # ... to the horizon, not to 256
    assert int(out.vlm.cache.lengths.max()) == horizon - 1  # the last token is sampled, never fed


def test_a_horizon_caps_the_buckets():
    # a 600-position prompt with 32 new tokens: 640, not the power of two 1024
    assert [bucket(600, 1000, h) for h in (600, 632, 641, 2000)] == [640, 640, 704, 1000]
    assert bucket(100, 1000, 110) == 128 and bucket(100, 1000, 200) == 128  # the power of two when smaller
    assert bucket(300, 1000, 250) == 512  # past the horizon (the step API's own decode): powers of two again
    assert bucket(1, 1000, 1) == MIN_BUCKET and bucket(600, 620, 632) == 620  # never below 64, never above max_len


def test_reset_sizes_the_cache_for_the_prompt_and_reuses_buffers_that_fit():
    cache = StaticKVCache(num_layers=1, num_kv_heads=1, head_dim=2, max_len=2000)
    cache.reset(600, 632)
    assert cache.capacity == 640
    buffers, views = cache.allocations, cache.past_feeds(empty=False)
    cache.reset(610, 630)  # the same bucket: the same buffers, so the backend's bindings stay valid
    assert cache.allocations == buffers and cache.past_feeds(empty=False) is views
    cache.reset(600, 700)  # a nearby, longer horizon: grows to 704 ...
    assert cache.capacity == 704 and cache.allocations == buffers + 1
    cache.reset(600, 632)  # ... and a shorter one keeps it (no re-allocation per request)
    assert cache.capacity == 704 and cache.allocations == buffers + 1
    cache.reset(600, 1100)  # a longer generation: the power of two, 1024 < 1152
    assert cache.capacity == 1024 and cache.allocations == buffers + 2
    cache.reset(100)  # no horizon (the step API): the prompt's power of two; the cache also shrinks
    assert cache.capacity == 128 and cache.horizon is None and cache.allocations == buffers + 3


def test_decode_rebinds_after_any_reallocation(artifact_factory):
    """Decode bound at capacity A, the cache re-allocated to B with no decode step (here: reset for a 200-position
    prompt), then A again in new buffers: the decode must feed the new buffers, not the views it bound first
    (which belong to released buffers that still hold the first image's cache)."""
    from vtc.runtime.pipeline import VLM

    art = artifact_factory("mha-default", "none", None)
    vlm = VLM(art)
    prompt = vlm.prepare_prompt("what is this?")
    first, second = vlm.prepare_image(random_image(5)), vlm.prepare_image(random_image(6))
    vlm.generate_from(first, prompt, 12, ignore_eos=True)
    capacity, buffers = vlm.cache.capacity, vlm.cache.allocations
    vlm.cache.reset(200)
    assert vlm.cache.capacity != capacity
    got = vlm.generate_from(second, prompt, 12, ignore_eos=True).token_ids
    assert vlm.cache.capacity == capacity and vlm.cache.allocations == buffers + 2
    assert got == VLM(art).generate_from(second, prompt, 12, ignore_eos=True).token_ids


def test_bad_block_size_and_negative_horizon_are_refused_up_front(artifact_factory):
    from vtc.runtime.backend import OrtBackend
    from vtc.runtime.errors import InputError, UsageError
    from vtc.runtime.pipeline import VLM

    for bad in (48, 512, 8, "x", None):
        with pytest.raises(UsageError, match="block size .* is not one ONNX Runtime takes"):
            OrtBackend(matmul_block_size=bad)
    assert [OrtBackend(matmul_block_size=b).matmul_block_size for b in (-1, 0, 16, "256")] == ["-1", "0", "16", "256"]
    vlm = VLM(artifact_factory("mha-default", "none", None))
    prompt, pixels = vlm.prepare_prompt("what is this?"), vlm.prepare_image(random_image(5))
    with pytest.raises(InputError, match="max_new_tokens must be 0 or more"):
        vlm.prefill(prompt, vlm.encode_image(pixels)[0], max_new_tokens=-1)
