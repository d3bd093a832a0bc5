"""KV statistics -> kv_scales.json -> per-layer scales and fallback (see the package docstring)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vtc.export.llm import QMAX
from vtc.runtime.errors import InputError, UsageError

SCHEMA, VERSION = "vtc.kv_scales", 1
DEFAULT_FALLBACK = 0.08  # relative RMS error above which a layer stays float16
MAX_THRESHOLD = 65504.0  # float16's largest value: a K/V magnitude beyond it fits no cache vtc builds


@dataclass
class KVStats:
    """Per layer: absmax [Hkv, Dh] of K and V, and a token subsample [Hkv, T, Dh] for percentiles/errors."""

    k_absmax: list = field(default_factory=list)
    v_absmax: list = field(default_factory=list)
    k_samples: list = field(default_factory=list)
    v_samples: list = field(default_factory=list)
    pairs: int = 0

    def add(self, kv: list, keep: int, rng: np.random.Generator) -> None:
        """kv[i] = [K, V] tensors [1, Hkv, T, Dh]; keeps at most `keep` random tokens per layer."""
        for i, (k, v) in enumerate(kv):
            k, v = k[0].float().numpy(), v[0].float().numpy()  # [Hkv, T, Dh]
            pick = np.sort(rng.choice(k.shape[1], size=min(keep, k.shape[1]), replace=False))
            if i == len(self.k_absmax):
                self.k_absmax.append(np.abs(k).max(1))
                self.v_absmax.append(np.abs(v).max(1))
                self.k_samples.append(k[:, pick])
                self.v_samples.append(v[:, pick])
                continue
            self.k_absmax[i] = np.maximum(self.k_absmax[i], np.abs(k).max(1))
            self.v_absmax[i] = np.maximum(self.v_absmax[i], np.abs(v).max(1))
            self.k_samples[i] = np.concatenate([self.k_samples[i], k[:, pick]], 1)
            self.v_samples[i] = np.concatenate([self.v_samples[i], v[:, pick]], 1)
        self.pairs += 1


def collect(adapter, model, method, plan, src: Path, pairs: list, new_tokens: int = 8,
            on_pair: Callable[[int], None] | None = None, samples_per_pair: int = 256) -> KVStats:
    """Run every (image, prompt) pair through the eager PyTorch path with the compression applied."""
    from vtc.export.reference import eager_generate
    from vtc.runtime.preprocess import load_image
    from vtc.runtime.text import TextProcessor

    if not pairs:
        raise UsageError("the calibration set is empty.", "Pass --calib-images DIR and --calib-prompts FILE with data.")
    image_prompt = adapter.image_prompt(src)  # the built image layout (tiles: one image token per block)
    pre = adapter.preprocessor(src)
    text = TextProcessor.from_dir(src, image_token=adapter.image_token, tokenizer_as_is=adapter.tokenizer_as_is,
                                  image_prompt=image_prompt)
    blocks = 1 if image_prompt is None else image_prompt.count(text.image_token)
    stats, rng = KVStats(), np.random.default_rng(0)
    for n, (image, prompt) in enumerate(pairs):
        pixels = torch.from_numpy(pre(load_image(image)))
        ids = text.prompt_ids(prompt) if text.chat_template else text.encode(text.expand_image(f"{text.image_token}\n{prompt}"))
        parts = text.split_at_images(ids, blocks, adapter.image_token_id(model))  # the adapter adds the text between
        before, after = parts[0], parts[-1]
        _, kv = eager_generate(adapter, model, method, plan, pixels, before, after, new_tokens)
        stats.add(kv, samples_per_pair, rng)
        if on_pair:
            on_pair(n + 1)
    return stats


def thresholds(stats: KVStats, statistic: str, granularity: str) -> tuple[list, list]:
    """Per layer [Hkv, Dh] clipping thresholds for K and V."""
    pct = None
    if statistic != "absmax":
        try:
            pct = float(statistic.split(":", 1)[1]) if statistic.startswith("percentile:") else None
        except ValueError:
            pct = None
        if pct is None or not 0 < pct <= 100:
            raise UsageError(f"unknown calibration statistic {statistic!r}.",
                             "Use absmax or percentile:P with 0 < P <= 100 (e.g. percentile:99.99).")

    def one(absmax, samples):
        thr = absmax if pct is None else np.percentile(np.abs(samples), pct, axis=1)
        return np.broadcast_to(thr.max(1, keepdims=True), thr.shape).copy() if granularity == "head" else thr
    if granularity not in ("channel", "head"):
        raise UsageError(f"unknown scale granularity {granularity!r}.", "Use channel or head.")
    return ([one(a, s) for a, s in zip(stats.k_absmax, stats.k_samples)],
            [one(a, s) for a, s in zip(stats.v_absmax, stats.v_samples)])


def write(path: Path, stats: KVStats, k_thr: list, v_thr: list, meta: dict) -> dict:
    data = {"schema": SCHEMA, "version": VERSION, **meta,
            "layers": [{"k": k.tolist(), "v": v.tolist()} for k, v in zip(k_thr, v_thr)]}
    data["calibration"]["pairs"] = stats.pairs
    Path(path).write_text(json.dumps(data) + "\n")
    return data


def read(path: Path, expect_model: dict, expect_compression: dict) -> dict:
    """Load and validate kv_scales.json against the model and compression being built."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise InputError(f"--kv-scales {path} is not a readable JSON file ({why}).", "Recreate it with `vtc-export calibrate`.") from e
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("version") != VERSION:
        raise InputError(f"--kv-scales {path} is not a vtc.kv_scales version {VERSION} file.", "Recreate it with `vtc-export calibrate`.")
    for key in ("model", "compression", "calibration"):
        if not isinstance(data.get(key), dict):
            raise InputError(f"--kv-scales {path} has no {key!r} object (a vtc.kv_scales file records what it was "
                             "calibrated for and on).", "Recreate it with `vtc-export calibrate`.")
    model = data["model"]
    for key in ("num_layers", "num_kv_heads", "head_dim"):
        if model.get(key) != expect_model[key]:
            raise InputError(f"--kv-scales {path} is for another model ({key} {model.get(key)} != {expect_model[key]}).",
                             "Calibrate this checkpoint: vtc-export calibrate --model DIR ...")
    comp = data["compression"]
    for key in ("method", "k_visual"):
        if comp.get(key) != expect_compression[key]:
            raise InputError(f"--kv-scales {path} was calibrated for {key}={comp.get(key)!r}, this build uses "
                             f"{expect_compression[key]!r}.", "Compression changes the KV statistics: calibrate with the same --method and --ratio.")
    try:
        layers = [(np.asarray(l["k"], np.float64), np.asarray(l["v"], np.float64)) for l in data["layers"]]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"--kv-scales {path} has malformed layers ({e}).", "Recreate it with `vtc-export calibrate`.") from e
    shape = (expect_model["num_kv_heads"], expect_model["head_dim"])
    if len(layers) != expect_model["num_layers"] or any(k.shape != shape or v.shape != shape for k, v in layers):
        raise InputError(f"--kv-scales {path} has layers of the wrong shape (expected {expect_model['num_layers']} x {shape}).",
                         "Recreate it with `vtc-export calibrate`.")
    if any(not np.all(np.isfinite(a)) or np.any(a < 0) for pair in layers for a in pair):
        raise InputError(f"--kv-scales {path} has negative or non-finite thresholds.", "Recreate it with `vtc-export calibrate`.")
    for i, pair in enumerate(layers):
        for name, a in zip("kv", pair):
            if a.size and a.max() > MAX_THRESHOLD:
                raise InputError(f"--kv-scales {path} has a threshold of {a.max():.3g} (layer {i}, {name}); thresholds "
                                 f"are K/V magnitudes, at most {MAX_THRESHOLD:g} (the float16 range a fallback layer "
                                 "stores).", "Recreate it with `vtc-export calibrate`.")
    data["_arrays"] = layers
    return data


def scales(thr: np.ndarray, dtype: str) -> torch.Tensor:
    """scale = threshold / qmax; a channel that was always 0 gets scale 1."""
    t = torch.as_tensor(thr, dtype=torch.float32)
    return torch.where(t > 0, t / QMAX[dtype], torch.ones_like(t))


def rel_error(samples: np.ndarray, scale: torch.Tensor, dtype: str) -> float:
    """||x - dequant(quant(x))|| / ||x|| over the sampled tokens; samples [Hkv, T, Dh], scale [Hkv, Dh]."""
    from vtc.export.llm import quantize

    x = torch.from_numpy(samples).float()[None]  # [1, Hkv, T, Dh]
    s = scale[None, :, None, :]
    back = quantize(x, s, dtype).to(torch.float32) * s
    return float(torch.linalg.norm(x - back) / torch.linalg.norm(x).clamp_min(1e-12))


def layer_plan(k_thr: list, v_thr: list, stats: KVStats | None, dtype: str, fallback: float):
    """(layer dtypes, k scales, v scales, per-layer errors, fallback layers) for a quantized cache."""
    dtypes, ks, vs, errors, fell = [], [], [], [], []
    for i, (kt, vt) in enumerate(zip(k_thr, v_thr)):
        k_s, v_s = scales(kt, dtype), scales(vt, dtype)
        err = None
        if stats is not None:
            err = max(rel_error(stats.k_samples[i], k_s, dtype), rel_error(stats.v_samples[i], v_s, dtype))
        if err is not None and err > fallback:
            dtypes.append("float16"), ks.append(None), vs.append(None), fell.append(i)
        else:
            dtypes.append(dtype), ks.append(k_s), vs.append(v_s)
        errors.append(err)
    return dtypes, ks, vs, errors, fell
