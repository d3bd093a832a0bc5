"""Artifact-vs-PyTorch parity: the report stored in the manifest and checked by `vtc-export verify`.

Per graph: max-abs difference and cosine similarity of its outputs against the PyTorch reference
(vision: image embeddings; llm: prefill logits, then decode logits teacher-forced on the reference's
tokens). End to end: the runtime's free-running greedy tokens against HF `generate`.
Tolerances, by KV cache dtype (the reference always keeps a float32 cache):
    float32: cosine >= 0.9999, max-abs <= 1e-3 * max(1, max|reference|)
    float16: cosine >= 0.9999, max-abs <= 1e-2 * max(1, max|reference|)
    int8:    cosine >= 0.999,  max-abs <= 5e-2 * max(1, max|reference|)
    fp8:     cosine >= 0.99,   max-abs <= 1.5e-1 * max(1, max|reference|)
Float caches: a token mismatch fails unless the reference's top-2 logit margin at that step is within
the logits tolerance (a near-tie that rounding may legitimately flip; reported as such). Quantized
caches (int8, fp8): greedy tokens are reported, not required to match; the logits criterion decides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vtc.export.reference import Reference, reference_generate
from vtc.runtime.errors import ParityError
from vtc.runtime.images import gradient_image
from vtc.runtime.pipeline import VLM, Prompt

COSINE_MIN = 0.9999
REL_MAX_ABS = 1e-3
KV_TOLERANCE = {"float32": (0.9999, 1e-3), "float16": (0.9999, 1e-2), "bfloat16": (0.999, 5e-2), "int8": (0.999, 5e-2),
                "float8_e4m3fn": (0.99, 1.5e-1)}  # (cosine_min, rel_max_abs)
# Graphs in reduced precision (build --dtype) against HF float32: 10 (fp16) / 7 (bf16) mantissa bits per op.
DTYPE_TOLERANCE = {"float32": (COSINE_MIN, REL_MAX_ABS), "float16": (0.9995, 5e-2), "bfloat16": (0.999, 1e-1)}


def tolerance(kv_dtype: str, graph_dtype: str = "float32") -> tuple[float, float]:
    """The looser of the KV cache's and the graphs' tolerances."""
    a, b = KV_TOLERANCE[kv_dtype], DTYPE_TOLERANCE[graph_dtype]
    return min(a[0], b[0]), max(a[1], b[1])


def compare(actual: np.ndarray, expected: np.ndarray, tol: tuple = (COSINE_MIN, REL_MAX_ABS)) -> dict:
    a, e = np.asarray(actual, np.float64).ravel(), np.asarray(expected, np.float64).ravel()
    cos = float(a @ e / (np.linalg.norm(a) * np.linalg.norm(e) + 1e-30))
    max_abs = float(np.abs(a - e).max()) if a.size else 0.0
    limit = tol[1] * max(1.0, float(np.abs(e).max()) if e.size else 1.0)
    return {"max_abs": max_abs, "cosine": cos, "tolerance_max_abs": limit, "cosine_min": tol[0],
            "ok": bool(cos >= tol[0] and max_abs <= limit)}


def _teacher_forced_logits(vlm: VLM, prompt: Prompt, image_embeds: np.ndarray, tokens: list[int]) -> list:
    logits = [vlm.prefill(prompt, image_embeds)]
    for t in tokens[:-1]:
        logits.append(vlm.decode_step(t))
    return logits


def _token_check(got: list[int], ref: Reference, tol: float) -> dict:
    mismatch = next((i for i, (a, b) in enumerate(zip(got, ref.tokens)) if a != b), None)
    out = {"runtime": got, "reference": ref.tokens, "equal": mismatch is None, "first_mismatch": mismatch}
    if mismatch is not None:
        top2 = torch.topk(ref.step_logits[mismatch], 2).values
        margin = float(top2[0] - top2[1])
        out["reference_margin"] = margin
        out["near_tie"] = margin <= tol
    return out


def parity_inputs(vlm: VLM, prompt_text: str = "Describe the image.") -> tuple[Prompt, np.ndarray]:
    """The parity prompt (chat template, or raw with the image token) and image, through the runtime's own
    tokenizer and preprocessing (no graph needed: VLM(..., open_graphs=False) will do)."""
    has_template = vlm.manifest.text.chat_template is not None
    prompt = vlm.prepare_prompt(prompt_text if has_template else f"{vlm.manifest.model.image_token}\n{prompt_text}",
                                raw=not has_template)
    return prompt, vlm.prepare_image(gradient_image(vlm.preprocessor.output_hw[0]))


def check_tokens_fit(vlm: VLM, prompt: Prompt, tokens: int, flag: str) -> None:
    """Refuse `tokens` greedy tokens that the artifact's cache cannot hold, before PyTorch generates them."""
    from vtc.runtime.errors import UsageError

    widest = max(vlm.manifest.compression.kv_visual_per_layer)
    room = vlm.manifest.text.max_seq_len - prompt.num_text - widest
    if tokens > room:
        raise UsageError(f"{flag} {tokens} does not fit: the parity prompt leaves room for {room} tokens in this "
                         f"artifact's {vlm.manifest.text.max_seq_len}-position cache.", f"Pass {flag} {max(room, 1)} or less.")


def reference(adapter, model, method, plan, spec, prompt: Prompt, pixels: np.ndarray, max_new_tokens: int,
              forced_image_kept: list[int] | None = None) -> Reference:
    """The PyTorch side (vtc.export.reference), in the model's own dtype (the inputs are cast to it)."""
    dtype = next(model.parameters()).dtype
    return reference_generate(adapter, model, method, plan, spec, torch.from_numpy(pixels).to(dtype), prompt.before,
                              prompt.after, max_new_tokens, forced_image_kept)


def check(artifact_dir: Path, adapter, model, method, plan, spec, max_new_tokens: int = 8,
          prompt_text: str = "Describe the image.", vlm: VLM | None = None, kv_dtype: str | None = None,
          graph_dtype: str | None = None) -> dict:
    """Run the artifact and the PyTorch reference (`model`, float32) on the same inputs; return the parity report."""
    vlm = vlm or VLM(artifact_dir, check_files=False)
    prompt, pixels = parity_inputs(vlm, prompt_text)
    check_tokens_fit(vlm, prompt, max_new_tokens, "--tokens" if vlm.manifest.parity else "--parity-tokens")
    ref = reference(adapter, model, method, plan, spec, prompt, pixels, max_new_tokens)
    report = compare_runtime(vlm, prompt, pixels, ref, kv_dtype, graph_dtype, prompt_text)
    runtime_kept = report.pop("_runtime_selection")
    sel = report["selection"]
    if method.stage == "llm" and not sel["kept_index_equal"] and not sel.get("required", True) \
            and runtime_kept["pure"]:
        # A quantized KV cache (or reduced-precision graphs) flipped near-ties in the in-LLM ranking: the logits
        # after the selection then compare different tokens. Re-run the reference on the artifact's own selection,
        # so every graph is still held to PyTorch; the report says how many kept tokens differed.
        ref = reference(adapter, model, method, plan, spec, prompt, pixels, max_new_tokens, runtime_kept["image_kept"])
        report = compare_runtime(vlm, prompt, pixels, ref, kv_dtype, graph_dtype, prompt_text)
        report.pop("_runtime_selection")
        report["selection"].update(kept_index_equal=False, token_map_equal=sel["token_map_equal"], differing=sel["differing"],
                                   reference="re-run on the artifact's selection (it differed from PyTorch's)")
    return report


def compare_runtime(vlm: VLM, prompt: Prompt, pixels: np.ndarray, ref: Reference, kv_dtype: str | None = None,
                    graph_dtype: str | None = None, prompt_text: str = "Describe the image.", encoded: tuple | None = None
                    ) -> dict:
    """The runtime side against a computed Reference: per-graph logits and the free-running greedy tokens.
    `encoded`: the vision graph's outputs for `pixels`, computed before (its session may be closed by now)."""
    kv_dtype = kv_dtype or vlm.manifest.kv_cache.dtype
    graph_dtype = graph_dtype or vlm.manifest.dtype
    tol = tolerance(kv_dtype, graph_dtype)
    max_new_tokens = len(ref.tokens)
    encoded = encoded if encoded is not None else vlm.encode_image(pixels)
    image_embeds = encoded[0]
    vision = compare(image_embeds, ref.image_embeds.float().numpy(), DTYPE_TOLERANCE[graph_dtype])
    forced = _teacher_forced_logits(vlm, prompt, image_embeds, ref.tokens)
    prefill = compare(forced[0], ref.step_logits[0].numpy(), tol)
    decode = compare(np.stack(forced[1:]), torch.stack(ref.step_logits[1:]).numpy(), tol)
    result = vlm.generate_from(pixels, prompt, max_new_tokens, ignore_eos=True, encoded=encoded)
    tokens = _token_check(result.token_ids, ref, prefill["tolerance_max_abs"])
    selection = {"kept_index_equal": result.kept_indices == ref.kept_index,
                 "token_map_equal": result.token_map == ref.token_map, "kept": len(result.kept_indices),
                 "differing": len(set(result.kept_indices) - set(ref.kept_index))}
    selection["ok"] = selection["kept_index_equal"] and selection["token_map_equal"]
    quantized = kv_dtype in ("int8", "float8_e4m3fn")
    tokens["required"] = not quantized
    if quantized or graph_dtype != "float32":  # rank-based selections may legitimately differ; logits decide
        selection["required"] = False
        selection["ok"] = True
    ok = (vision["ok"] and prefill["ok"] and decode["ok"] and selection["ok"]
          and (quantized or tokens["equal"] or tokens.get("near_tie", False)))
    merged = sum(1 for t in result.token_map if t >= 0)
    return {"_runtime_selection": {"image_kept": list(result.kept_indices), "pure": merged == len(result.kept_indices)},
            "ok": bool(ok), "new_tokens": max_new_tokens, "prompt": prompt_text, "image": "gradient_image(seed=0)",
            "text_tokens": prompt.num_text, "kv_dtype": kv_dtype, "graph_dtype": graph_dtype,
            "graphs": {"vision": vision, "llm_prefill": prefill, "llm_decode": decode}, "selection": selection,
            "greedy_tokens": tokens, "tolerance": {"cosine_min": tol[0], "rel_max_abs": tol[1]}}


BUILD_FIX = "This is a vtc bug for this model; please report it with the model config."


def raise_if_failed(report: dict, fix: str = BUILD_FIX) -> None:
    if report["ok"]:
        return
    bad = [f"{g}: max_abs={r['max_abs']:.3g} cosine={r['cosine']:.6f}" for g, r in report["graphs"].items() if not r["ok"]]
    if not report.get("selection", {"ok": True})["ok"]:
        bad.append("the kept/merged visual tokens differ")
    tok = report["greedy_tokens"]
    if tok.get("required", True) and not tok["equal"] and not tok.get("near_tie"):
        bad.append(f"greedy tokens differ from step {tok['first_mismatch']}")
    raise ParityError("the exported graphs do not match the PyTorch model: " + "; ".join(bad) + ".", fix)
