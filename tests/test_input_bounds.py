"""Input bounds (issue 15, defects 4, 6, 7): image size before any decode/pad/resize, thread counts, sampling
parameters, safetensors headers, checkpoint configs, KV scales files, compute capabilities.

Library-level checks; the CLI's one-line errors for the same inputs are in tests/test_cli_errors.py. The two
memory measurements run `vtc-export` / the preprocessor in a child process and read that child's own peak
RSS (os.wait4), so nothing else the suite runs can inflate it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vtc.runtime.errors import InputError, ModelError, UsageError
from vtc.runtime.preprocess import (MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, MAX_WORK_PIXELS, ImagePreprocessor,
                                    check_image_size, load_image)

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "examples" / "shapes.png"
MAX_RSS = 1.5 * 2 ** 30  # acceptance 3: a hostile image costs at most 1.5 GB, or is refused
CLIP = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
        "crop_size": {"height": 336, "width": 336}}
LLAVA_PAD = {**CLIP, "image_processor_type": "LlavaImageProcessor", "do_pad": True}


def _png(path: Path, width: int, height: int) -> Path:
    Image.new("RGB", (width, height), (10, 120, 200)).save(path)
    return path


def _peak_rss(argv: list[str], **kw) -> tuple[int, int, str]:
    """(exit code, peak RSS in bytes of that child alone, stderr) of `argv`."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
    err = proc.stderr.read().decode()
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.stderr.close()
    return proc.returncode, usage.ru_maxrss * 1024, err  # Linux: ru_maxrss in KiB


def _vtc_export() -> list[str]:
    script = Path(sys.executable).with_name("vtc-export")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "vtc.export.cli"]


# -- images: pixel count and sides, before any decode, pad or resize -------------------------------
@pytest.mark.parametrize("size", [(30000, 1), (80000, 1), (1, 30000), (MAX_IMAGE_SIDE + 1, 10), (7000, 7000)])
def test_load_image_refuses_over_the_limits_from_the_header(tmp_path, size, monkeypatch):
    path = _png(tmp_path / "big.png", *size)
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(1))  # the header check comes first
    with pytest.raises(InputError) as e:
        load_image(path)
    assert decoded == []
    msg = str(e.value)
    assert f"{size[0]}x{size[1]} pixels" in msg and f"{MAX_IMAGE_PIXELS / 1e6:g} MP" in msg and str(MAX_IMAGE_SIDE) in msg


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height and that has no pixel data (a decompression-bomb header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("size, contains", [((8000, 6000), "8000x6000 pixels"), ((14000, 13000), "too large an image"),
                                            ((2 ** 20, 2 ** 20), "too large an image")])
def test_bomb_headers_refused_in_one_line(tmp_path, size, contains):
    """PIL only warns from 89 MP and raises its own DecompressionBombError from 179 MP: both are one InputError."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning reaches the user either
        with pytest.raises(InputError, match=contains):
            load_image(_png_header_only(tmp_path / "bomb.png", *size))


def test_limits_accept_ordinary_photos(tmp_path):
    check_image_size(6000, 4000)  # 24 MP
    check_image_size(MAX_IMAGE_SIDE, MAX_IMAGE_PIXELS // MAX_IMAGE_SIDE)
    assert load_image(_png(tmp_path / "ok.png", 4000, 3000)).size == (4000, 3000)
    for w, h in ((0, 10), (MAX_IMAGE_SIDE + 1, 1), (7000, 6000)):
        with pytest.raises(InputError):
            check_image_size(w, h)


@pytest.mark.parametrize("cfg, size, step", [
    (LLAVA_PAD, (10000, 3000), "padding it to a square"),  # 30 MP in, 100 MP padded
    (CLIP, (16000, 20), "resizing it"),  # 336 x 268800 after the shortest-edge resize
    ({**CLIP, "do_center_crop": False, "size": {"height": 9000, "width": 9000}}, (100, 100), "resizing it"),
])
def test_preprocessing_refuses_what_would_grow_past_the_work_limit(cfg, size, step, monkeypatch):
    pre = ImagePreprocessor.from_config(cfg)
    image = Image.new("RGB", size)
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: pytest.fail("resized before the check"))
    with pytest.raises(InputError) as e:
        pre(image)
    assert step in str(e.value) and f"{MAX_WORK_PIXELS / 1e6:g} MP" in str(e.value)


def test_pil_image_given_directly_is_checked_too(artifact_factory):
    """VLM.generate with a PIL image (no file, no header): the same bound, before convert/pad/resize."""
    from vtc.runtime.pipeline import VLM

    vlm = VLM(artifact_factory("mha-default", "none"))
    with pytest.raises(InputError, match="30000x1 pixels"):
        vlm.generate(Image.new("RGB", (30000, 1)), "What is this?", max_new_tokens=1)
    with pytest.raises(InputError, match="PIL image"):
        vlm.prepare_image(np.zeros((4, 4, 3), np.uint8))


def test_pad_to_square_is_unchanged_in_pixels():
    """The PIL-side pad gives HF's numpy pad pixel for pixel (centred, floor offsets, mean colour)."""
    pre = ImagePreprocessor.from_config({**LLAVA_PAD, "do_resize": False, "do_center_crop": False})
    rng = np.random.default_rng(0)
    for h, w in ((5, 8), (8, 5), (7, 7), (1, 4)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        side = max(h, w)
        want = np.empty((side, side, 3), np.uint8)
        want[...] = [int(m * 255) for m in pre.image_mean]
        top, left = (side - h) // 2, (side - w) // 2
        want[top:top + h, left:left + w] = arr
        assert np.array_equal(pre.view(Image.fromarray(arr)), want)


def test_run_on_30000x1_and_80000x1_png_is_refused_cheaply(tmp_path, artifact_factory):
    """Acceptance 3 (measured): before, 3.8 GB RSS / 13 s and 9.9 GB / 31 s, answered silently."""
    art = artifact_factory("mha-default", "none")
    for width in (30000, 80000):
        img = _png(tmp_path / f"w{width}.png", width, 1)
        assert img.stat().st_size < 400
        rc, rss, err = _peak_rss([*_vtc_export(), "run", str(art), "--image", str(img), "--prompt", "What?"])
        assert rc == 1 and f"{width}x1 pixels" in err and "Traceback" not in err, err
        assert rss < MAX_RSS, f"peak RSS {rss / 2 ** 20:.0f} MiB"


def test_worst_accepted_image_stays_under_the_memory_bound(tmp_path):
    """The largest image the bounds let through, padded to a square (LLaVA): 40 MP in, 64 MP padded."""
    img = _png(tmp_path / "big.png", 8000, 5000)
    code = ("import sys; from vtc.runtime.preprocess import ImagePreprocessor, load_image; "
            f"x = ImagePreprocessor.from_config({LLAVA_PAD!r})(load_image(sys.argv[1])); "
            "assert x.shape == (1, 3, 336, 336)")
    rc, rss, err = _peak_rss([sys.executable, "-c", code, str(img)])
    assert rc == 0, err
    assert rss < MAX_RSS, f"peak RSS {rss / 2 ** 20:.0f} MiB"


# -- threads ---------------------------------------------------------------------------------------
def test_threads_bounded_by_usable_cores(monkeypatch):
    from vtc.runtime.backend import OrtBackend, check_threads, get_backend, usable_cores

    cores = usable_cores()
    assert check_threads(None) is None and check_threads(0) is None and check_threads(cores) == cores
    for bad in (-1, cores + 1, 100000, 1.5, "x", True):
        with pytest.raises(UsageError, match=f"{cores} usable core"):
            check_threads(bad)
    with pytest.raises(UsageError):
        get_backend("onnxruntime", threads=-2)
    monkeypatch.setenv("VTC_THREADS", "100000")
    with pytest.raises(UsageError, match="VTC_THREADS"):
        OrtBackend()
    monkeypatch.setenv("VTC_THREADS", "1")
    assert OrtBackend().threads == 1


# -- sampling --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, flag", [
    ({"temperature": float("nan")}, "--temperature"), ({"temperature": -1.0}, "--temperature"),
    ({"temperature": float("inf")}, "--temperature"), ({"top_p": 0.0}, "--top-p"), ({"top_p": 2.0}, "--top-p"),
    ({"top_p": float("nan")}, "--top-p"), ({"seed": -5}, "--seed"), ({"seed": 1.5}, "--seed"),
])
def test_sampling_config_validated_at_construction(kw, flag):
    from vtc.runtime.sampling import SamplingConfig

    with pytest.raises(UsageError, match=flag):
        SamplingConfig(**kw)


def test_sampler_survives_extreme_but_valid_settings():
    from vtc.runtime.sampling import Sampler, SamplingConfig

    logits = np.array([1.0, 3.0, 2.0], np.float32)
    assert Sampler(SamplingConfig(temperature=1e-300, seed=0))(logits) == 1  # no overflow to NaN
    assert Sampler(SamplingConfig(temperature=1.0, top_p=1e-9, seed=0))(logits) == 1
    assert Sampler(SamplingConfig(temperature=1e300, seed=2 ** 70))(logits) in (0, 1, 2)


# -- checkpoints: safetensors headers, config.json, required files --------------------------------
def _copy(ckpt: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt, dst)
    return dst


@pytest.mark.parametrize("damage, contains", [
    ("truncated", "need"), ("header_1e15", "header claims 1000000000000000 bytes"), ("short", "fewer than the 8"),
    ("header_not_json", "not valid JSON"), ("appended", "the file has"),
])
def test_check_weights_reads_only_the_header(tmp_path, tiny_checkpoints, damage, contains):
    from vtc.export.models.base import check_weights

    d = _copy(tiny_checkpoints["mha-default"], tmp_path)
    f = d / "model.safetensors"
    data = f.read_bytes()
    n = int.from_bytes(data[:8], "little")
    f.write_bytes({"truncated": data[: len(data) // 2], "header_1e15": (10 ** 15).to_bytes(8, "little") + data[8:],
                   "short": data[:5], "header_not_json": data[:8] + b"[" * n + data[8 + n:],
                   "appended": data + b"\0" * 16}[damage])
    with pytest.raises(ModelError, match="not a complete safetensors file") as e:
        check_weights(d)
    assert contains in str(e.value)
    check_weights(tiny_checkpoints["mha-default"])  # the intact one passes


@pytest.mark.parametrize("text, contains", [("[1, 2]", "JSON list"), ("[" * 100000 + "]" * 100000, "nested"),
                                            (b"\xff\xfe{}", "not valid JSON")])
def test_read_config_refuses_what_is_not_a_config(tmp_path, text, contains):
    from vtc.export.models import read_config

    (tmp_path / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ModelError, match=contains):
        read_config(tmp_path)


def test_resolve_requires_tokenizer_and_image_processor_before_loading(tmp_path, tiny_checkpoints):
    from vtc.export import models

    d = _copy(tiny_checkpoints["mha-default"], tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer.json"):
        models.resolve(d)
    shutil.copy(tiny_checkpoints["mha-default"] / "tokenizer.json", d)
    for name in ("processor_config.json", "preprocessor_config.json"):
        (d / name).unlink(missing_ok=True)
    with pytest.raises(ModelError, match="image processor config"):
        models.resolve(d)


# -- KV scales files, statistics, compute capabilities ---------------------------------------------
MODEL = {"num_layers": 2, "num_kv_heads": 1, "head_dim": 2}
COMP = {"method": "none", "k_visual": 4}


def _scales(tmp_path: Path, edit=None) -> Path:
    data = {"schema": "vtc.kv_scales", "version": 1, "model": dict(MODEL), "compression": dict(COMP),
            "statistic": "absmax", "granularity": "channel", "calibration": {"set": "test", "pairs": 1},
            "layers": [{"k": [[1.0, 2.0]], "v": [[0.5, 0.25]]}] * 2}
    if edit:
        edit(data)
    path = tmp_path / "kv_scales.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, contains", [
    (lambda d: d.pop("calibration"), "no 'calibration' object"),
    (lambda d: d.update(model=[1]), "no 'model' object"),
    (lambda d: d["layers"].__setitem__(0, {"k": [[1e300, 1.0]], "v": [[1.0, 1.0]]}), "threshold of 1e\\+300"),
    (lambda d: d["layers"].__setitem__(0, {"k": [[7e4, 1.0]], "v": [[1.0, 1.0]]}), "at most 65504"),
])
def test_kv_scales_read_refuses_incomplete_or_absurd_files(tmp_path, edit, contains):
    from vtc.calibration import kv

    assert kv.read(_scales(tmp_path), MODEL, COMP)["_arrays"][0][0].shape == (1, 2)
    with pytest.raises(InputError, match=contains):
        kv.read(_scales(tmp_path, edit), MODEL, COMP)
    (tmp_path / "deep.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(InputError, match="nested too deeply"):
        kv.read(tmp_path / "deep.json", MODEL, COMP)


@pytest.mark.parametrize("stat", ["percentile:abc", "percentile:0", "percentile:101", "percentile:nan", "median"])
def test_kv_statistic_refused_before_the_model_loads(stat):
    from vtc.calibration import kv
    from vtc.export.build import BuildArgs, _check_args

    with pytest.raises(UsageError, match="--kv-statistic"):
        _check_args(BuildArgs(kv_cache="int8", kv_statistic=stat))
    with pytest.raises(UsageError, match="statistic"):
        kv.thresholds(kv.KVStats(), stat, "channel")


@pytest.mark.parametrize("kw, flag", [({"parity_tokens": 0}, "--parity-tokens"), ({"max_seq_len": 10 ** 9}, "--max-seq-len"),
                                      ({"text_budget": 300, "max_seq_len": 256}, "--text-budget"),
                                      ({"parity_tokens": 256, "max_seq_len": 256}, "--parity-tokens")])
def test_build_sizes_bounded_before_anything_loads(kw, flag):
    from vtc.export.build import BuildArgs, _check_args

    with pytest.raises(UsageError, match=flag):
        _check_args(BuildArgs(**kw))


@pytest.mark.parametrize("cc", ["abc", "8", "8.7.1", "x.y", "-8.7", "8.", "８.７"])
def test_target_cc_must_be_major_minor(cc):
    from vtc.export.lint import check_target_cc

    with pytest.raises(UsageError, match="--target-cc"):
        check_target_cc(cc)
    check_target_cc("8.7")
    check_target_cc(None)


# -- output paths ----------------------------------------------------------------------------------
def test_check_outputs_probes_before_any_work(tmp_path):
    from vtc.export.commands.ui import check_output_dir, check_outputs

    check_outputs(None, str(tmp_path / "r.json"))
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind
    for p, contains in ((tmp_path, "is a directory"), (tmp_path / "no" / "r.json", "does not exist"),
                        (SHAPES / "r.json", "is a file, not a directory")):
        with pytest.raises(UsageError, match=contains):
            check_outputs(str(p))
    check_output_dir(tmp_path / "a" / "b", "--output")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="is a file"):
        check_output_dir(SHAPES, "--output")
    if Path("/sys").is_dir():  # not writable even for root
        with pytest.raises(UsageError, match="does not let this process create files"):
            check_outputs("/sys/vtc-report.json")
