"""SmolVLM / Idefics3 (issue 17): preprocessing, prompt expansion and generation against HF's own code.

Tiny random checkpoints of the real HF classes (tests/helpers/tiny.py TINY_IDEFICS3), every matrix re-drawn
normal(0, 0.2) so greedy tokens depend on the image. HF's side is what a transformers user runs: the PIL image
processor (SmolVLMImageProcessorPil / Idefics3ImageProcessorPil), the prompt string processing_smolvlm.py builds
(Idefics3Processor itself where it can be constructed: SmolVLMProcessor needs torchvision) and `generate`.
The global-image parity checks run PARITY_MATRIX's SmolVLM / Idefics3 rows (tests/helpers/matrix.py); the methods
these architectures refuse are checked in test_registries.py (matrix.REFUSED).
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.builds import nullstep
from tests.helpers.images import random_image
from tests.helpers.matrix import parity_cases
from tests.helpers.subprocs import vtc_export_cmd
from tests.helpers.tiny import TINY_IDEFICS3
from vtc.export import methods, models
from vtc.export.reference import _greedy, reference_generate
from vtc.runtime.errors import UsageError
from vtc.runtime.pipeline import VLM

PROMPT = "What shapes do you see in the picture?"
NEW_TOKENS = 32
LAYER_1 = {"fastv": {"layer": "1"}, "tokencarve": {"layer": "1"}}  # the tiny LMs have 2 layers
ROWS = parity_cases(model_types=("smolvlm", "idefics3"))  # every PARITY_MATRIX row of these architectures
IMAGE_SIZES = ((150, 200), (200, 150), (64, 64), (31, 97), (300, 299))  # (height, width)


@pytest.fixture(scope="module")
def ckpts(tiny_checkpoints):
    return {name: tiny_checkpoints[name] for name in TINY_IDEFICS3}


@pytest.fixture(scope="module")
def build_art(tmp_path_factory, ckpts):
    """build(name, method, ratio, splits=None, options=None, **kw) -> artifact path, once per distinct key;
    options None = LAYER_1's."""
    from vtc.export.build import BuildArgs, build

    root, cache = tmp_path_factory.mktemp("idefics3-art"), {}

    def make(name, method="none", ratio=None, splits=None, options=None, **kw):
        opts = dict(LAYER_1.get(method, {}) if options is None else options)
        key = (name, method, ratio, splits, repr(sorted(opts.items())), repr(sorted(kw.items())))
        if key not in cache:
            args = BuildArgs(model=str(ckpts[name]), method=method, ratio=ratio, output=str(root / f"a{len(cache)}"),
                             max_seq_len=512, text_budget=64, method_options=opts, image_splits=splits,
                             parity_tokens=kw.pop("parity_tokens", NEW_TOKENS), **kw)
            cache[key] = build(args, nullstep).path
        return cache[key]

    return make


def _image(seed: int, hw=(150, 200)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))


def _hf_image_processor(ckpt):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(ckpt, local_files_only=True)


def _adapter(ckpt, splits=None):
    return models.resolve(ckpt).with_image_splits(splits)


# -- 1. preprocessing: bit-identical to HF's PIL image processor at the built layout ---------------------------
@pytest.mark.parametrize("name", list(TINY_IDEFICS3))
def test_global_image_preprocessing_is_hf_bit_for_bit(ckpts, name):
    """--image-splits 0 = HF's do_image_splitting=False: resize to size.longest_edge, then to T x T."""
    hf = _hf_image_processor(ckpts[name])
    assert type(hf).__name__.endswith("ImageProcessorPil")
    ours = _adapter(ckpts[name]).preprocessor(ckpts[name])
    for seed, hw in enumerate(IMAGE_SIZES):
        img = _image(seed, hw)
        want = hf(images=[img], do_image_splitting=False, return_tensors="np")["pixel_values"][0]  # [1, 3, T, T]
        got = ours(img)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got, want), hw


def test_grayscale_and_transparent_inputs_match_hf(ckpts):
    """RGB conversion as HF does it: L promoted, transparency composited onto white."""
    ckpt = ckpts["smolvlm-gqa"]
    hf, ours = _hf_image_processor(ckpt), _adapter(ckpt).preprocessor(ckpt)
    rgba = _image(7).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.random.default_rng(1).integers(0, 256, (150, 200), dtype=np.uint8)))
    for img in (_image(8).convert("L"), rgba):
        want = hf(images=[img], do_image_splitting=False, return_tensors="np")["pixel_values"][0]
        assert np.array_equal(ours(img), want)


# -- 2. the prompt: the string processing_smolvlm.py / Idefics3Processor build, token for token ---------------
def _hf_prompt_ids(ckpt, arch: str, rows: int, cols: int, n: int, image) -> list[int]:
    """The ids HF's processor gives `PROMPT` with one image (chat template, <image> expanded, tokenized)."""
    from transformers import AutoTokenizer, Idefics3Processor
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    tok = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if arch == "idefics3":  # the processor class itself (it needs no torchvision)
        proc = Idefics3Processor(_hf_image_processor(ckpt), tok, image_seq_len=n)
        size = {"longest_edge": max(rows, cols) * proc.image_processor.max_image_size["longest_edge"]} if rows else None
        kw = {"do_image_splitting": bool(rows)} | ({"size": size} if size else {})
        return proc(text=[text], images=[[image]], images_kwargs=kw)["input_ids"][0]
    expanded = text.replace("<image>", get_image_prompt_string(rows, cols, n, fake_token_around_image=tok.fake_image_token,
                                                               image_token=tok.image_token,
                                                               global_image_token=tok.global_image_token))
    return tok(expanded)["input_ids"]


def _runtime_ids(vlm, prompt) -> list[int]:
    """The runtime's prompt with each of its B image tokens repeated N/B times (what HF's model is fed)."""
    n = vlm.manifest.compression.n_visual
    blocks = [prompt.before, *getattr(prompt, "between", []), prompt.after]
    per = n // (len(blocks) - 1)
    ids = list(blocks[0])
    for text in blocks[1:]:
        ids += [vlm.manifest.model.image_token_id] * per + list(text)
    return ids


@pytest.mark.parametrize("name", list(TINY_IDEFICS3))
def test_prompt_ids_equal_hf_processor(build_art, ckpts, name):
    vlm = VLM(build_art(name, "none", 1.0))
    arch = TINY_IDEFICS3[name][0].arch
    want = _hf_prompt_ids(ckpts[name], arch, 0, 0, vlm.manifest.compression.n_visual, _image(3))
    assert _runtime_ids(vlm, vlm.prepare_prompt(PROMPT)) == list(want)


# -- 3. ratio 1.0: runtime greedy tokens == HF generate fed by HF's processor -----------------------------------
def _hf_generate(ckpt, arch, image, rows=0, cols=0) -> tuple[list[int], np.ndarray]:
    import transformers

    model = getattr(transformers, "SmolVLMForConditionalGeneration" if arch == "smolvlm" else
                    "Idefics3ForConditionalGeneration").from_pretrained(ckpt, attn_implementation="eager").eval()
    hf = _hf_image_processor(ckpt)
    size = {"size": {"longest_edge": max(rows, cols) * hf.max_image_size["longest_edge"]}} if rows else {}
    enc = hf(images=[image], do_image_splitting=bool(rows), return_row_col_info=True, return_tensors="pt", **size)
    assert (enc["rows"][0][0], enc["cols"][0][0]) == (rows, cols), "HF chose another layout for this image"
    n = model.model.image_seq_len
    ids = torch.tensor([list(_hf_prompt_ids(ckpt, arch, rows, cols, n, image))])
    tokens, _ = _greedy(model, NEW_TOKENS, input_ids=ids, attention_mask=torch.ones_like(ids),
                        pixel_values=enc["pixel_values"], pixel_attention_mask=enc["pixel_attention_mask"])
    return tokens, enc["pixel_values"][0].numpy()


@pytest.mark.parametrize("name", [c.config for c in ROWS if c.method == "none"])
def test_uncompressed_tokens_equal_hf_generate(build_art, ckpts, name, tmp_path):
    vlm = VLM(build_art(name, "none", 1.0))
    assert vlm.manifest.parity["ok"] and vlm.manifest.parity["greedy_tokens"]["equal"]
    image = _image(21)
    path = tmp_path / "img.png"
    image.save(path)
    want, hf_pixels = _hf_generate(ckpts[name], TINY_IDEFICS3[name][0].arch, image)
    pixels = vlm.prepare_image(path)
    assert np.array_equal(pixels, hf_pixels)
    got = vlm.generate_from(pixels, vlm.prepare_prompt(PROMPT), NEW_TOKENS, ignore_eos=True).token_ids
    assert len(set(want)) > 4, "degenerate HF output: the check would not discriminate"
    assert got == want


# -- 4. every applicable method at 0.25 == the PyTorch reference with the same selection -------------------------
def check_against_reference(vlm, ckpt, method, ratio, image, splits=None, options=None):
    """Kept indices, token map and 32 greedy tokens of the artifact against vtc.export.reference."""
    adapter = _adapter(ckpt, splits)
    model = adapter.load(ckpt)
    spec = adapter.visual_spec(model)
    m = methods.get(method)
    plan = m.plan(spec, ratio, dict(LAYER_1.get(method, {}) if options is None else options))
    assert plan.k == vlm.manifest.compression.k_visual
    prompt, pixels = vlm.prepare_prompt(PROMPT), vlm.prepare_image(image)
    ref = reference_generate(adapter, model, m, plan, spec, torch.from_numpy(pixels), prompt.before, prompt.after,
                             NEW_TOKENS)
    res = vlm.generate_from(pixels, prompt, NEW_TOKENS, ignore_eos=True)
    assert res.kept_indices == ref.kept_index and len(res.kept_indices) == plan.k
    assert res.token_map == ref.token_map
    assert len(set(ref.tokens)) > 4, "degenerate reference: the check would not discriminate"
    assert res.token_ids == ref.tokens
    return plan


@pytest.mark.parametrize("method,name,ratio,options", [(c.method, c.config, c.ratio, c.options) for c in ROWS
                                                        if c.method != "none"],
                         ids=[f"{c.method}-{c.config}-{c.ratio}" for c in ROWS if c.method != "none"])
def test_applicable_method_equals_reference(build_art, ckpts, method, name, ratio, options):
    art = build_art(name, method, ratio, options=options)
    vlm = VLM(art)
    report = vlm.manifest.parity
    assert report["ok"] and report["greedy_tokens"]["equal"] and report["new_tokens"] == NEW_TOKENS
    plan = check_against_reference(vlm, ckpts[name], method, ratio, random_image(5), options=options)
    assert plan.k == round(ratio * 16)  # 16 tokens per image (0.25: pool's 2x2 windows give the same 4)


# -- 5. refusals (the methods that need a [CLS] token: test_registries.py, from matrix.REFUSED) -------------
@pytest.mark.parametrize("splits, words", [((1, 1), "never splits"), ((2, 0), "at least one row"),
                                           ((0, 3), "at least one row"), ((70, 2), "at most 64 tiles"),
                                           ((2, 2, 2), "two numbers"), ((3,), "two numbers")])
def test_grids_the_processor_never_produces_are_refused(ckpts, tmp_path, splits, words):
    from vtc.export.build import BuildArgs, prepare

    with pytest.raises(UsageError) as err:
        prepare(BuildArgs(model=str(ckpts["smolvlm-gqa"]), output=str(tmp_path / "o"), image_splits=splits), nullstep)
    assert words in str(err.value)


def test_image_splits_refused_for_fixed_size_architectures(tiny_checkpoints, tmp_path):
    from vtc.export.build import BuildArgs, prepare

    with pytest.raises(UsageError, match="does not apply to llava"):
        prepare(BuildArgs(model=str(tiny_checkpoints["mha-default"]), output=str(tmp_path / "o"), image_splits=(2, 2)),
                nullstep)


def test_cli_refuses_a_bad_grid_in_one_line(ckpts, tmp_path):
    out = subprocess.run([*vtc_export_cmd(), "build", "--model", str(ckpts["smolvlm-gqa"]),
                          "--image-splits", "1", "1", "--output", str(tmp_path / "o")], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "image splits 1 1" in out.stderr and "--image-splits 0" in out.stderr


def test_list_shows_the_architectures():
    out = subprocess.run([*vtc_export_cmd(), "list"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "idefics3" in out.stdout and "smolvlm" in out.stdout and "SmolVLMForConditionalGeneration" in out.stdout


# -- 6. a static tile grid: --image-splits R C ----------------------------------------------------------------
SQUARISH = ((150, 200), (200, 150), (300, 299), (100, 100))  # HF's processor picks 2 x 2 for these at 2 tiles a side


@pytest.mark.parametrize("name", list(TINY_IDEFICS3))
def test_tiled_preprocessing_is_hf_bit_for_bit_where_hf_picks_the_layout(ckpts, name):
    from vtc.runtime.tiling import hf_layout

    hf, ckpt = _hf_image_processor(ckpts[name]), ckpts[name]
    t = hf.max_image_size["longest_edge"]
    for splits, sizes in (((2, 2), SQUARISH), ((1, 2), ((31, 97), (40, 130))), ((2, 1), ((97, 31),))):
        ours = _adapter(ckpt, splits).preprocessor(ckpt)
        for seed, hw in enumerate(sizes):
            img = _image(seed, hw)
            enc = hf(images=[img], do_image_splitting=True, return_row_col_info=True, return_tensors="np",
                     size={"longest_edge": max(splits) * t})
            assert (enc["rows"][0][0], enc["cols"][0][0]) == splits == hf_layout(*hw, max(splits) * t, t), hw
            got = ours(img)
            assert got.shape == (splits[0] * splits[1] + 1, 3, t, t)
            assert np.array_equal(got, enc["pixel_values"][0]), (splits, hw)


def test_tiled_preprocessing_forces_the_built_grid_on_any_image(ckpts):
    """An image HF would tile 1 x 2 still gives the 2 x 2 layout's shapes (the graph's static batch)."""
    ckpt = ckpts["smolvlm-gqa"]
    pixels = _adapter(ckpt, (2, 2)).preprocessor(ckpt)(_image(1, (31, 97)))
    assert pixels.shape == (5, 3, 64, 64) and np.isfinite(pixels).all()


@pytest.mark.parametrize("name", list(TINY_IDEFICS3))
def test_tiled_prompt_ids_equal_hf_processor(build_art, ckpts, name):
    vlm = VLM(build_art(name, "none", 1.0, (2, 2)))
    prompt = vlm.prepare_prompt(PROMPT)
    assert len(prompt.between) == 4  # 4 tiles + the global image: 5 blocks
    want = _hf_prompt_ids(ckpts[name], TINY_IDEFICS3[name][0].arch, 2, 2, 16, _image(3))
    assert _runtime_ids(vlm, prompt) == list(want)


@pytest.mark.parametrize("name", list(TINY_IDEFICS3))
def test_tiled_uncompressed_tokens_equal_hf_generate(build_art, ckpts, name, tmp_path):
    vlm = VLM(build_art(name, "none", 1.0, (2, 2)))
    assert vlm.manifest.compression.n_visual == 80 and vlm.manifest.parity["greedy_tokens"]["equal"]
    image = _image(22)
    path = tmp_path / "img.png"
    image.save(path)
    want, hf_pixels = _hf_generate(ckpts[name], TINY_IDEFICS3[name][0].arch, image, 2, 2)
    pixels = vlm.prepare_image(path)
    assert np.array_equal(pixels, hf_pixels)
    got = vlm.generate_from(pixels, vlm.prepare_prompt(PROMPT), NEW_TOKENS, ignore_eos=True).token_ids
    assert len(set(want)) > 4
    assert got == want


@pytest.mark.parametrize("method", ["pool", "random", "uniform", "divprune"])
def test_tiled_methods_keep_a_quota_per_image_and_equal_reference(build_art, ckpts, method):
    name = "smolvlm-gqa"
    vlm = VLM(build_art(name, method, 0.25, (2, 2)))
    assert vlm.manifest.parity["greedy_tokens"]["equal"]
    plan = check_against_reference(vlm, ckpts[name], method, 0.25, random_image(6), (2, 2))
    assert plan.k == 20  # 4 of 16 in each of the 5 images
    res = vlm.generate_from(vlm.prepare_image(random_image(6)), vlm.prepare_prompt(PROMPT), 1, ignore_eos=True)
    per_image = [sum(1 for i in res.kept_indices if b * 16 <= i < (b + 1) * 16) for b in range(5)]
    assert per_image == [4] * 5


@pytest.mark.parametrize("method", ["fastv", "tokencarve"])
def test_in_llm_methods_are_refused_for_tiles(ckpts, tmp_path, method):
    from tests.helpers.builds import refused_before_export

    msg = refused_before_export(ckpts["smolvlm-gqa"], method, 0.25, tmp_path / "out", image_splits=(2, 2),
                                method_options=dict(LAYER_1[method]))
    assert "one contiguous block" in msg and "pool" in msg and "divprune" in msg and "fastv" not in msg.split(":")[-1]


def test_tiled_artifact_verifies_and_calibrates(build_art, ckpts):
    """`verify` rebuilds the reference at the built layout (manifest build_args.image_splits); an INT8 KV cache is
    calibrated through the same tiled prompts (calibration.kv) and passes the build's parity."""
    from vtc.export.verify import verify

    report = verify(build_art("smolvlm-gqa", "none", 1.0, (2, 2)), tokens=NEW_TOKENS)
    assert report["ok"] and report["greedy_tokens"]["equal"]
    # 8 parity tokens (the build default): int8 logits drift past the tolerance over 32 steps on these wide weights
    vlm = VLM(build_art("smolvlm-gqa", "pool", 0.25, (2, 2), kv_cache="int8", parity_tokens=8))
    assert vlm.manifest.kv_cache.dtype == "int8" and vlm.manifest.parity["ok"]
    assert vlm.manifest.kv_cache.accuracy  # quantized vs float32 KV measured on held-out pairs


def test_calibrate_cli_at_the_tiled_layout(ckpts, tmp_path, capsys):
    """`calibrate --image-splits 2 2` measures the KV of the tiled prompts (80 visual tokens, 20 kept), not the global
    image's: other scales than `--image-splits 0`; the build at 2 x 2 takes them, one at the global-image layout
    refuses them."""
    import json

    from vtc.export import kvquant
    from vtc.export.build import BuildArgs, prepare
    from vtc.export.cli import main
    from vtc.runtime.errors import InputError

    ckpt, images, prompts = ckpts["smolvlm-gqa"], tmp_path / "images", tmp_path / "prompts.jsonl"
    images.mkdir()
    for seed in (1, 2):
        random_image(seed).save(images / f"{seed}.png")
    prompts.write_text('{"prompt": "What shapes do you see?"}\n')
    scales = {}
    for splits in (["2", "2"], ["0"]):
        out = tmp_path / f"kv-{'x'.join(splits)}.json"
        rc = main(["calibrate", "--model", str(ckpt), "--method", "pool", "--ratio", "0.25", "--image-splits", *splits,
                   "--calib-images", str(images), "--calib-prompts", str(prompts), "--output", str(out)])
        assert rc == 0, capsys.readouterr().err
        scales["x".join(splits)] = out
    tiled, single = (json.loads(scales[k].read_text()) for k in ("2x2", "0"))
    assert (tiled["compression"]["k_visual"], single["compression"]["k_visual"]) == (20, 4)
    assert tiled["calibration"]["pairs"] == 2 and tiled["layers"] != single["layers"]

    def kv_plan(file, splits):
        args = BuildArgs(model=str(ckpt), method="pool", ratio=0.25, output=str(tmp_path / "o"), kv_cache="int8",
                         kv_scales=str(file), image_splits=splits, max_seq_len=512, text_budget=64)
        (tmp_path / "art").mkdir(exist_ok=True)
        return kvquant.plan(tmp_path / "art", prepare(args, nullstep, check_output=False), nullstep)

    assert kv_plan(scales["2x2"], (2, 2)).dtype == "int8"
    with pytest.raises(InputError, match="k_visual=20"):
        kv_plan(scales["2x2"], (0,))  # 4 tokens kept of the global image's 16
