"""Qwen2.5-VL / Qwen2-VL (issue 16): preprocessing, prompt expansion, M-RoPE positions and generation against
HF's own code.

Tiny random checkpoints of the real HF classes (tests/helpers/tiny.py TINY_QWEN), every matrix re-drawn
normal(0, 0.2) so greedy tokens depend on the image. HF's side is what a transformers user runs: the PIL image
processor (Qwen2VLImageProcessorPil), the prompt processing_qwen2_5_vl.py builds (the processor class itself needs
torchvision: its expansion is repeated here, `_hf_prompt_ids`), `get_rope_index` and `generate`.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.builds import nullstep
from tests.helpers.matrix import parity_cases
from tests.helpers.subprocs import vtc_export_cmd
from tests.helpers.tiny import TINY_QWEN, write_tiny_qwen
from vtc.export import methods, models
from vtc.export.models.qwen2_5_vl import patchify
from vtc.export.reference import _greedy, reference_generate
from vtc.runtime import positions
from vtc.runtime.errors import UsageError
from vtc.runtime.pipeline import VLM

PROMPT = "What shapes do you see in the picture?"
NEW_TOKENS = 32
APPLICABLE = ("pool", "random", "uniform", "divprune", "fastv", "tokencarve")
LAYER_1 = {"fastv": {"layer": "1"}, "tokencarve": {"layer": "1"}}
# (height, width) of images HF's smart_resize maps to each built size (so HF and vtc see the same pixels)
SAME_SIZE = {(112, 112): ((112, 112), (110, 115), (120, 104)), (168, 224): ((168, 224), (170, 220), (160, 230))}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {name: write_tiny_qwen(root, name) for name in TINY_QWEN}


@pytest.fixture(scope="module")
def build_art(tmp_path_factory, ckpts):
    """build(name, method, ratio) -> artifact path at the config's image size, once per key."""
    from vtc.export.build import BuildArgs, build

    root, cache = tmp_path_factory.mktemp("qwen-art"), {}

    def make(name, method="none", ratio=None):
        key = (name, method, ratio)
        if key not in cache:
            args = BuildArgs(model=str(ckpts[name]), method=method, ratio=ratio, output=str(root / f"a{len(cache)}"),
                             max_seq_len=256, text_budget=64, method_options=dict(LAYER_1.get(method, {})),
                             image_size=TINY_QWEN[name][2], parity_tokens=NEW_TOKENS)
            cache[key] = build(args, nullstep).path
        return cache[key]

    return make


def _image(seed: int, hw) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))


def _hf_image_processor(ckpt):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(ckpt, local_files_only=True)


def _adapter(name, ckpt):
    return models.resolve(ckpt).with_image_size(TINY_QWEN[name][2])


def _spec(name):
    return TINY_QWEN[name][0]


# -- 1. preprocessing: bit-identical to HF's PIL image processor at the built size --------------------------------
@pytest.mark.parametrize("name", ["qwen25-tied", "qwen25-windows"])
def test_preprocessing_is_hf_bit_for_bit(ckpts, name):
    """Resize + rescale + normalise (the runtime) then the vision graph's patchify == HF's pixel_values [n, 1176]."""
    hf, hw = _hf_image_processor(ckpts[name]), TINY_QWEN[name][2]
    assert type(hf).__name__ == "Qwen2VLImageProcessorPil"
    ours = _adapter(name, ckpts[name]).preprocessor(ckpts[name])
    for seed, size in enumerate(SAME_SIZE[hw]):
        img = _image(seed, size)
        enc = hf(images=[img], return_tensors="np")
        assert enc["image_grid_thw"].tolist() == [[1, hw[0] // 14, hw[1] // 14]], size
        pixels = ours(img)
        assert pixels.dtype == np.float32 and pixels.shape == (1, 3, *hw)
        got = patchify(torch.from_numpy(pixels), 14, 2, 2).numpy()
        assert np.array_equal(got, enc["pixel_values"]), size


def test_any_image_is_resized_to_the_built_size(ckpts):
    """HF would pick 84 x 308 for this 80 x 300 image; vtc resizes it to the static 112 x 112."""
    ckpt = ckpts["qwen25-tied"]
    pixels = _adapter("qwen25-tied", ckpt).preprocessor(ckpt)(_image(1, (80, 300)))
    assert pixels.shape == (1, 3, 112, 112) and np.isfinite(pixels).all()
    assert _hf_image_processor(ckpt)(images=[_image(1, (80, 300))])["image_grid_thw"].tolist() == [[1, 6, 22]]


@pytest.mark.parametrize("window, hw, layout", [(56, (112, 112), "batched"), (84, (168, 224), "mask"),
                                                (112, (112, 112), "full"), (56, (168, 280), "batched")])
def test_vision_forward_equals_hf_get_image_features(tmp_path, window, hw, layout):
    """The graph's vision walk (baked windows: a batch of equal windows, a mask for uneven ones, or one window)
    against HF's get_image_features (cu_seqlens, torch.split per window) on the same pixels."""
    from vtc.export.models.qwen2_5_vl import ADAPTER
    from vtc.export.random_qwen import RandomQwenSpec, write_random_qwen

    ckpt = write_random_qwen(tmp_path / "q", RandomQwenSpec(window_size=window, vision_layers=3,
                                                            fullatt_block_indexes=(1,)), 3)
    adapter = ADAPTER.with_image_size(hw)
    model = adapter.load(ckpt)
    c = model.vtc_static
    assert {"batched": c.window_len is not None, "mask": c.window_mask is not None,
            "full": c.window_len is None and c.window_mask is None}[layout]
    pixels = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = adapter.visual_features(model, pixels).embeds
        want = adapter.reference_features(model, pixels).embeds
    assert got.shape == (1, hw[0] * hw[1] // 784, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()))


# -- 2. the prompt: processing_qwen2_5_vl.py's expansion, token for token ----------------------------------------
def _hf_prompt_ids(ckpt, n: int) -> list[int]:
    """The chat template, then <|image_pad|> -> n of them (Qwen2_5_VLProcessor.__call__), then the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = text.replace("<|image_pad|>", "<|placeholder|>" * n).replace("<|placeholder|>", "<|image_pad|>")
    return tok(text)["input_ids"]


def _runtime_ids(vlm, prompt) -> list[int]:
    return [*prompt.before, *[vlm.manifest.model.image_token_id] * vlm.manifest.compression.n_visual, *prompt.after]


# -- 3. ratio 1.0: runtime greedy tokens == HF generate fed by HF's processor ------------------------------------
def _hf_generate(ckpt, name, image) -> list[int]:
    import transformers

    cls = "Qwen2VLForConditionalGeneration" if _spec(name).arch == "qwen2_vl" else "Qwen2_5_VLForConditionalGeneration"
    model = getattr(transformers, cls).from_pretrained(ckpt, attn_implementation="eager").eval()
    enc = _hf_image_processor(ckpt)(images=[image], return_tensors="pt")
    n = int(enc["image_grid_thw"].prod()) // 4
    ids = torch.tensor([_hf_prompt_ids(ckpt, n)])
    tokens, _ = _greedy(model, NEW_TOKENS, input_ids=ids, attention_mask=torch.ones_like(ids),
                        pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"],
                        mm_token_type_ids=(ids == model.config.image_token_id).int())
    return tokens


@pytest.mark.parametrize("name", list(TINY_QWEN))
def test_uncompressed_tokens_equal_hf_generate(build_art, ckpts, name, tmp_path):
    vlm = VLM(build_art(name, "none", 1.0))
    m = vlm.manifest
    assert m.lm.rope == "mrope" and m.parity["ok"] and m.parity["greedy_tokens"]["equal"]
    hw = TINY_QWEN[name][2]
    assert m.compression.grid == [hw[0] // 28, hw[1] // 28]
    prompt = vlm.prepare_prompt(PROMPT)
    assert _runtime_ids(vlm, prompt) == _hf_prompt_ids(ckpts[name], m.compression.n_visual)
    image = _image(21, SAME_SIZE[hw][1])
    path = tmp_path / "img.png"
    image.save(path)
    want = _hf_generate(ckpts[name], name, image)
    got = vlm.generate_from(vlm.prepare_image(path), prompt, NEW_TOKENS, ignore_eos=True).token_ids
    assert len(set(want)) > 4, "degenerate HF output: the check would not discriminate"
    assert got == want


# -- 4. positions: the runtime's M-RoPE rule against HF's get_rope_index -----------------------------------------
def test_mrope_positions_equal_hf_get_rope_index(ckpts):
    """Uncompressed: the runtime's [3, 1, S] == HF's; compressed: HF's columns at the kept tokens and the text."""
    name = "qwen25-windows"
    adapter = _adapter(name, ckpts[name])
    model = adapter.load(ckpts[name])
    rows, cols = adapter.visual_spec(model).grid
    n, before, after = rows * cols, [100, 101, 102, 103, 104], [105, 106, 107]  # text ids (no specials)
    scheme = positions.get("mrope")
    kept_sets = [list(range(n)), [0, 5, 9, 30, 47], list(range(0, n, 4))]
    for kept in kept_sets:
        want = adapter.prompt_positions(model, before, kept, after).numpy()
        got = scheme(len(before) + len(kept) + len(after), len(before), np.array(kept), (rows, cols))
        assert got.shape == (3, 1, len(before) + len(kept) + len(after))
        assert np.array_equal(got, want), kept
    ids = torch.tensor([before + [model.config.image_token_id] * n + after])
    full, delta = model.model.get_rope_index(ids, (ids == model.config.image_token_id).int(),
                                             image_grid_thw=model.vtc_static.grid_thw)
    assert np.array_equal(scheme(ids.shape[1], len(before), np.arange(n), (rows, cols)), full.numpy())
    # decode continues at the largest position + 1: HF's rope_deltas rule (position = cache length + delta)
    assert int(full.max()) + 1 == ids.shape[1] + int(delta)


# -- 5. every applicable method at 0.25 == the PyTorch reference (same selection, same positions) ----------------
@pytest.mark.parametrize("case", parity_cases(*APPLICABLE, model_types=("qwen2_5_vl", "qwen2_vl")), ids=str)
def test_applicable_method_at_quarter_equals_reference(build_art, ckpts, case):
    name, method = case.config, case.method
    vlm = VLM(build_art(name, method, case.ratio))
    report = vlm.manifest.parity
    assert report["ok"] and report["greedy_tokens"]["equal"] and report["new_tokens"] == NEW_TOKENS
    adapter = _adapter(name, ckpts[name])
    model = adapter.load(ckpts[name])
    spec = adapter.visual_spec(model)
    m = methods.get(method)
    plan = m.plan(spec, case.ratio, dict(case.options))
    # qwen25-windows: 48 merged tokens (6 x 8) -> 12; qwen2-vl: 16 (4 x 4) -> 4 (pool 2x2, the others 0.25 * N)
    assert plan.k == vlm.manifest.compression.k_visual == spec.num_tokens // 4
    prompt, pixels = vlm.prepare_prompt(PROMPT), vlm.prepare_image(_image(5, TINY_QWEN[name][2]))
    ref = reference_generate(adapter, model, m, plan, spec, torch.from_numpy(pixels), prompt.before, prompt.after,
                             NEW_TOKENS)
    res = vlm.generate_from(pixels, prompt, NEW_TOKENS, ignore_eos=True)
    assert res.kept_indices == ref.kept_index and len(res.kept_indices) == plan.k
    assert res.token_map == ref.token_map
    assert len(set(ref.tokens)) > 4, "degenerate reference: the check would not discriminate"
    assert res.token_ids == ref.tokens


def test_positions_matter_for_compressed_prompts(build_art, ckpts):
    """The rule is not a no-op: renumbering the kept tokens 0..S-1 (1-D style) changes HF's greedy tokens."""
    name = "qwen25-windows"
    adapter = _adapter(name, ckpts[name])
    model = adapter.load(ckpts[name])
    spec = adapter.visual_spec(model)
    m = methods.get("divprune")
    plan = m.plan(spec, 0.25, {})
    vlm = VLM(build_art(name, "divprune", 0.25))
    prompt, pixels = vlm.prepare_prompt(PROMPT), torch.from_numpy(vlm.prepare_image(_image(5, (168, 224))))
    ref = reference_generate(adapter, model, m, plan, spec, pixels, prompt.before, prompt.after, NEW_TOKENS)
    from vtc.export.reference import _greedy_at_positions, reference_visual

    embeds, _, _ = reference_visual(adapter, model, m, plan, spec, pixels)
    table = adapter.embed_table(model)
    merged = adapter.merge_embeds(model, table, prompt.before, embeds, prompt.after)
    renumbered = torch.arange(merged.shape[1])[None, None].expand(3, 1, -1)
    other, _ = _greedy_at_positions(model, table, merged, renumbered, NEW_TOKENS)
    assert other != ref.tokens


def test_artifact_verifies_against_hf(build_art):
    """`verify` rebuilds the reference at the built image size (manifest build_args.image_size)."""
    from vtc.export.verify import verify

    report = verify(build_art("qwen2-vl", "none", 1.0), tokens=NEW_TOKENS)
    assert report["ok"] and report["greedy_tokens"]["equal"]


# -- 6. refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["cls-attn", "visionzip", "tome"])
def test_methods_that_need_cls_are_refused_with_what_applies(ckpts, tmp_path, method):
    from tests.helpers.builds import refused_before_export

    msg = refused_before_export(ckpts["qwen25-tied"], method, 0.25, tmp_path / "out", image_size=(112, 112))
    assert "[CLS]" in msg and "does not apply" in msg
    listed = msg.split("Methods that apply to it:")[1]
    assert all(m in listed for m in APPLICABLE) and "cls-attn" not in listed and "visionzip" not in listed


@pytest.mark.parametrize("size, words", [((100, 100), "--image-size 112 112"), ((448, 0), "multiples of 28"),
                                         ((448,), "two numbers"), ((28, 29), "--image-size 28 28")])
def test_image_size_not_a_multiple_of_28_is_refused(ckpts, tmp_path, size, words):
    from vtc.export.build import BuildArgs, prepare

    with pytest.raises(UsageError) as err:
        prepare(BuildArgs(model=str(ckpts["qwen25-tied"]), output=str(tmp_path / "o"), image_size=size), nullstep)
    assert words in str(err.value) + err.value.fix


def test_video_only_checkpoint_is_refused(ckpts, tmp_path):
    """A checkpoint with a video processor but no image processor: one ModelError that says so, nothing written."""
    import shutil

    from vtc.export.build import BuildArgs, prepare
    from vtc.runtime.errors import ModelError

    ckpt = tmp_path / "video-only"
    shutil.copytree(ckpts["qwen25-tied"], ckpt)
    cfg = (ckpt / "preprocessor_config.json").read_text().replace("Qwen2VLImageProcessor", "Qwen2VLVideoProcessor")
    (ckpt / "video_preprocessor_config.json").write_text(cfg)
    (ckpt / "preprocessor_config.json").unlink()
    with pytest.raises(ModelError, match="only video settings") as err:
        prepare(BuildArgs(model=str(ckpt), output=str(tmp_path / "o")), nullstep)
    assert "preprocessor_config.json" in err.value.fix and not (tmp_path / "o").exists()


def test_image_size_refused_for_fixed_size_architectures(tiny_checkpoints, tmp_path):
    from vtc.export.build import BuildArgs, prepare

    with pytest.raises(UsageError, match="does not apply to llava"):
        prepare(BuildArgs(model=str(tiny_checkpoints["mha-default"]), output=str(tmp_path / "o"),
                          image_size=(448, 448)), nullstep)


def test_cli_refuses_a_bad_image_size_in_one_line(ckpts, tmp_path):
    out = subprocess.run([*vtc_export_cmd(), "build", "--model", str(ckpts["qwen25-tied"]), "--image-size", "450",
                          "448", "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "multiples of 28" in out.stderr and "--image-size 448 448" in out.stderr
    assert not (tmp_path / "o").exists()


def test_list_shows_the_architectures():
    out = subprocess.run([*vtc_export_cmd(), "list"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "qwen2_5_vl" in out.stdout and "qwen2_vl" in out.stdout and "Qwen2_5_VLForConditionalGeneration" in out.stdout


def test_bench_spec_is_a_valid_qwen2_5_vl_config():
    """`make bench`'s model (RandomQwenSpec.bench(), tools/bench_qwen.py): HF accepts its config and builds the model
    on the meta device (no weights); the geometry is the documented one."""
    from types import SimpleNamespace

    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.vision_utils import get_vision_window_index

    from vtc.export.models.qwen2_5_vl import ADAPTER
    from vtc.export.random_qwen import SPECIALS, RandomQwenSpec, _config

    spec = RandomQwenSpec.bench()
    cfg = _config(spec, 1000, {t: i for i, t in enumerate(SPECIALS)})
    text, vision = cfg.text_config, cfg.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    lm = (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads)
    assert lm == (1024, 8, 16, 2)
    assert 2 * sum(text.rope_parameters["mrope_section"]) == head_dim == 64
    assert text.vocab_size == 32000 and not cfg.tie_word_embeddings
    vit = (vision.hidden_size, vision.depth, vision.window_size, vision.fullatt_block_indexes)
    assert vit == (640, 8, 112, [1, 3, 5, 7])
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    assert 195e6 < sum(p.numel() for p in model.parameters()) < 210e6  # README: 203.0 M
    assert ADAPTER.visual_spec(SimpleNamespace(config=cfg)).num_tokens == 256  # at the default 448 x 448
    _, cu = get_vision_window_index(torch.tensor([[1, 32, 32]]), 2, vision.window_size, vision.patch_size)
    assert len(cu) - 1 == 16 and set((cu[1:] - cu[:-1]).tolist()) == {64}  # 4 x 4 windows of 8 x 8 patches
