"""The build's KV-cache step: storage dtype per layer, static scales (calibrated now or read from
--kv-scales), fallback layers, and the accuracy report of the quantized cache against float32 KV."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vtc.export.llm import KVQuant

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float8_e4m3fn": 1}
SCALES_FILE = "kv_scales.json"


@dataclass
class KVPlan:
    dtype: str
    quant: KVQuant
    scale_source: str | None = None
    fallback_layers: list = field(default_factory=list)
    layer_errors: list = field(default_factory=list)
    accuracy: dict = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.dtype in ("int8", "float8_e4m3fn")

    def info(self, lm_spec, max_seq_len: int):
        from vtc.runtime import manifest as mf

        per_token = sum(2 * lm_spec.num_kv_heads * lm_spec.head_dim * ITEMSIZE[d] for d in self.quant.dtypes)
        acc = dict(self.accuracy)
        if self.layer_errors:
            acc["calibration_rel_error_per_layer"] = self.layer_errors
        return mf.KVCacheInfo(dtype=self.dtype, layer_dtypes=list(self.quant.dtypes),
                              layout="[layer][key|value] x [1, num_kv_heads, max_seq_len, head_dim]",
                              bytes_per_token=per_token, bytes_total=per_token * max_seq_len,
                              scales=SCALES_FILE if self.quantized else None, scale_source=self.scale_source,
                              fallback_layers=self.fallback_layers, accuracy=acc)


def expectations(bp) -> tuple[dict, dict]:
    """What a kv_scales.json must have been made for: (model, compression) of the BuildPlan `bp`."""
    plan, lm_spec = bp.plan, bp.lm
    model = {"architecture": bp.adapter.model_type, "source": str(Path(bp.src).resolve()),
             "num_layers": lm_spec.num_layers, "num_kv_heads": lm_spec.num_kv_heads, "head_dim": lm_spec.head_dim}
    comp = {"method": plan.method, "ratio": plan.ratio, "k_visual": plan.k, "options": dict(plan.options)}
    return model, comp


def calibrate(out: Path, bp, step) -> tuple[object, list, list, str]:
    """Run the calibration set; write `out` (kv_scales.json); (stats, k_thr, v_thr, source)."""
    from vtc.calibration import dataset, kv

    args = bp.args

    with tempfile.TemporaryDirectory(prefix="vtc-calib-") as scratch:
        if args.calib_images:
            pairs, name = dataset.user_pairs(args.calib_images, args.calib_prompts), f"user: {args.calib_images}"
        elif bp.demo:  # the demo model has only ever seen shapes on a grid: calibrate on its own task
            pairs = dataset.synthetic_pairs(scratch)
            name = f"default for the demo model: synthetic task scenes (seed {dataset.SYNTHETIC_CALIB_SEED})"
        else:
            pairs, name = dataset.default_pairs("calib"), "default: scikit-image sample photographs"
        with step(f"calibrating KV scales on {len(pairs)} image/prompt pairs ({args.kv_statistic}, per {args.kv_granularity})"):
            stats = kv.collect(bp.adapter, bp.model, bp.method, bp.plan, bp.src, pairs)
    k_thr, v_thr = kv.thresholds(stats, args.kv_statistic, args.kv_granularity)
    model, comp = expectations(bp)
    kv.write(out, stats, k_thr, v_thr, {"model": model, "compression": comp, "statistic": args.kv_statistic,
                                        "granularity": args.kv_granularity,
                                        "calibration": {"set": name, "new_tokens": 8}})
    return stats, k_thr, v_thr, f"calibrated: {name} ({len(pairs)} pairs)"


def plan(tmp: Path, bp, step) -> KVPlan:
    """The build's KV step for BuildPlan `bp`: float caches need nothing; int8/fp8 read --kv-scales or
    calibrate now (into tmp/kv_scales.json), then choose per-layer fallbacks."""
    from vtc.calibration import kv
    from vtc.export.build import KV_DTYPES

    args = bp.args
    dtype, n = KV_DTYPES[bp.kv_cache], bp.lm.num_layers
    if dtype in ("float32", "float16", "bfloat16"):
        return KVPlan(dtype, KVQuant((dtype,) * n, (None,) * n, (None,) * n))
    if args.kv_scales:
        model, comp = expectations(bp)
        data = kv.read(Path(args.kv_scales), model, comp)
        shutil.copy2(args.kv_scales, tmp / SCALES_FILE)
        k_thr, v_thr = [k for k, _ in data["_arrays"]], [v for _, v in data["_arrays"]]
        digest = hashlib.sha256(Path(args.kv_scales).read_bytes()).hexdigest()[:16]
        stats, source = None, f"file: {Path(args.kv_scales).resolve()} (sha256 {digest}; {data['calibration']})"
    else:
        stats, k_thr, v_thr, source = calibrate(tmp / SCALES_FILE, bp, step)
    dtypes, ks, vs, errors, fell = kv.layer_plan(k_thr, v_thr, stats, dtype, args.kv_fallback)
    return KVPlan(dtype, KVQuant(tuple(dtypes), tuple(ks), tuple(vs)), source, fell,
                  [None if e is None else round(e, 5) for e in errors])


def accuracy(vlm, bp, new_tokens: int = 32) -> dict:
    """The artifact (opened as `vlm`: quantized KV, ONNX Runtime) against the eager PyTorch path of
    BuildPlan `bp` with float32 KV on held-out pairs: teacher-forced logits cosine per step, and
    free-running greedy agreement."""
    import torch

    from vtc.calibration import dataset
    from vtc.export.parity import _teacher_forced_logits
    from vtc.export.reference import eager_generate

    adapter, model, method, plan_ = bp.adapter, bp.model, bp.method, bp.plan
    cosines, agree, exact = [], [], 0
    pairs = dataset.default_pairs("eval")
    for image, prompt in pairs:
        p, pixels = vlm.prepare_prompt(prompt), vlm.prepare_image(image)
        ref, _ = eager_generate(adapter, model, method, plan_, torch.from_numpy(pixels), p.before, p.after, new_tokens)
        forced = _teacher_forced_logits(vlm, p, vlm.encode_image(pixels)[0], ref.tokens)
        for got, want in zip(forced, ref.step_logits):
            a, b = np.asarray(got, np.float64), want.double().numpy()
            cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        tokens = vlm.generate_from(pixels, p, new_tokens, ignore_eos=True).token_ids
        agree.append(float(np.mean([x == y for x, y in zip(tokens, ref.tokens)])))
        exact += tokens == ref.tokens
    return {"pairs": len(pairs), "new_tokens": new_tokens, "reference": "eager PyTorch, float32 KV, same compression",
            "logits_cosine_median": float(np.median(cosines)), "logits_cosine_min": float(np.min(cosines)),
            "greedy_agreement_mean": float(np.mean(agree)), "greedy_sequences_identical": f"{exact}/{len(pairs)}"}


def write_scales(out: Path, args, step) -> Path:
    """`vtc-export calibrate`: validate and load like a build, calibrate, write `out` atomically."""
    import os
    import tempfile

    from vtc.export.build import prepare
    from vtc.runtime.errors import UsageError

    if out.is_dir():
        raise UsageError(f"--output {out} is a directory.", "Pass a file name, e.g. kv_scales.json.")
    bp = prepare(args, step, check_output=False)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else ".")
    os.close(fd)
    try:
        calibrate(Path(tmp), bp, step)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
