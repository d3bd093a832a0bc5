"""`make bench`: TTFT and decode latency of vtc artifacts vs HF transformers eager, same weights/threads.

Model: a bench-size random LLaVA (LLM hidden 1024 x 8 layers x 16 heads, vocab 32000; 336/14
CLIP-like encoder -> 576 visual tokens), written once to the vtc cache. Artifacts are built at
ratio 1.0 and 0.25 (pool, cls-attn) with a text budget of 32 and room for 64 new tokens.
Reported (medians over --runs after --warmup): TTFT (preprocess + vision + prefill + first token),
decode ms/token over --new-tokens greedy tokens, and the runtime's own overhead during decode (time
outside ONNX Runtime calls / decode loop time). Targets (issue 2) are checked and printed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

PROMPT = "What shapes do you see in the picture?"
IMAGE = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"


def bench_checkpoint() -> Path:
    from vtc.export.demo import cache_root
    from vtc.export.random_llava import RandomLlavaSpec, write_random_llava

    path = cache_root() / "bench-llava-v2"
    if not (path / "model.safetensors").is_file():
        print(f"writing bench checkpoint to {path} ...", file=sys.stderr)
        write_random_llava(path, RandomLlavaSpec.bench(), seed=0)
    return path


def build_artifact(ckpt: Path, method: str, ratio: float, root: Path) -> Path:
    from vtc.export.build import BuildArgs, build

    out = root / f"{method}-r{ratio:g}"
    if (out / "manifest.json").is_file():
        return out
    k_max = 577
    args = BuildArgs(model=str(ckpt), method=method, ratio=ratio, output=str(out), text_budget=32,
                     max_seq_len=k_max + 32 + 64, force=True, parity_tokens=4)
    t0 = time.perf_counter()
    build(args, lambda _label: contextlib.nullcontext())
    print(f"built {out.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def bench_vtc(art: Path, threads: int, runs: int, warmup: int, new_tokens: int) -> dict:
    from vtc.runtime.backend import get_backend
    from vtc.runtime.pipeline import VLM

    vlm = VLM(art, backend=get_backend(threads=threads))
    ttft, tpot, overhead = [], [], []
    for i in range(warmup + runs):
        res = vlm.generate(IMAGE, PROMPT, max_new_tokens=new_tokens + 1)
        t = res.timings_ms
        if i < warmup:
            continue
        ttft.append(t["ttft"])
        tpot.append(t["decode_per_token"])
        overhead.append(100 * (t["decode_per_token"] - t["decode_backend_per_token"]) / t["decode_per_token"])
    m = vlm.manifest
    return {"ttft_ms": statistics.median(ttft), "decode_ms": statistics.median(tpot),
            "overhead_pct": statistics.median(overhead), "prefill_tokens": res.prompt_tokens,
            "kv_bytes": m.kv_cache.bytes_per_token * res.prompt_tokens, "k": m.compression.k_visual}


def bench_hf(ckpt: Path, threads: int, runs: int, warmup: int, new_tokens: int) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, GenerationConfig, LlavaForConditionalGeneration

    torch.set_num_threads(threads)
    processor = AutoProcessor.from_pretrained(ckpt)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                                         add_generation_prompt=True)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        inputs = processor(images=Image.open(IMAGE), text=text, return_tensors="pt")
        gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.inference_mode():
            model.generate(**inputs, generation_config=gc)
        return (time.perf_counter() - t0) * 1e3

    ttft, tpot = [], []
    for i in range(warmup + runs):
        first, full = timed(1), timed(new_tokens + 1)
        if i >= warmup:
            ttft.append(first)
            tpot.append((full - first) / new_tokens)
    return {"ttft_ms": statistics.median(ttft), "decode_ms": statistics.median(tpot)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--methods", default="pool,cls-attn")
    ap.add_argument("--workdir", type=Path, default=None, help="where artifacts go (default: the vtc cache)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vtc.export.commands import quiet_transformers

    quiet_transformers()
    ckpt = bench_checkpoint()
    root = args.workdir or ckpt.parent / "bench-artifacts-v2"
    variants = [("none", 1.0)] + [(m, 0.25) for m in args.methods.split(",") if m]
    results = {}
    for method, ratio in variants:
        art = build_artifact(ckpt, method, ratio, root)
        results[f"vtc {method} r{ratio:g}"] = bench_vtc(art, args.threads, args.runs, args.warmup, args.new_tokens)
    results["HF eager r1"] = bench_hf(ckpt, args.threads, args.runs, args.warmup, args.new_tokens)
    report(results, args)
    return 0


def report(results: dict, args) -> None:
    print(f"\nbench-size random LLaVA, {args.threads} threads, {args.new_tokens} new tokens, "
          f"median of {args.runs} runs (CPU, ONNX Runtime)")
    print(f"{'variant':<22}{'K':>5}{'prefill tok':>12}{'TTFT ms':>10}{'decode ms/tok':>15}{'overhead %':>12}{'prompt KV MiB':>15}")
    for name, r in results.items():
        print(f"{name:<22}{r.get('k', 576):>5}{r.get('prefill_tokens', '-'):>12}{r['ttft_ms']:>10.1f}"
              f"{r['decode_ms']:>15.2f}{r.get('overhead_pct', float('nan')):>12.2f}"
              f"{r.get('kv_bytes', 0) / 2**20:>15.1f}")
    full, quarter, hf = results["vtc none r1"], results.get("vtc pool r0.25"), results["HF eager r1"]
    print("\ntargets:")
    if quarter:
        speedup = full["ttft_ms"] / quarter["ttft_ms"]
        print(f"  TTFT r0.25 (pool) vs r1.0: {speedup:.2f}x faster (target >= 2.5x): {'PASS' if speedup >= 2.5 else 'FAIL'}")
    ratio = full["decode_ms"] / hf["decode_ms"]
    print(f"  decode ms/token vtc r1.0 / HF eager: {ratio:.2f} (target <= 1.0): {'PASS' if ratio <= 1.0 else 'FAIL'}")
    worst = max(r["overhead_pct"] for r in results.values() if "overhead_pct" in r)
    print(f"  runtime overhead outside ONNX Runtime, decode: max {worst:.2f}% (target < 3%): "
          f"{'PASS' if worst < 3 else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
