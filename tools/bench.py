"""`make bench`: TTFT and decode latency of vtc artifacts vs HF transformers eager, same weights/threads.

Model: a bench-size random LLaVA (LLM hidden 1024 x 8 layers x 16 heads, vocab 32000; 336/14
CLIP-like encoder -> 576 visual tokens), written once to the vtc cache. Artifacts are built at
ratio 1.0 and 0.25 (pool, cls-attn) with a text budget of 32 and room for 64 new tokens.
Reported (p50 over --runs after --warmup, measured by vtc.runtime.profiler like `vtc-export profile`;
every run decodes --new-tokens tokens, EOS ignored): TTFT (preprocess + vision + prefill + first
token), decode ms/token (TPOT), the runtime's own overhead during decode (time
outside ONNX Runtime calls / decode loop time), the compressor's own time (vision-side methods: vision
graph time minus the uncompressed vision graph's; in-LLM methods: the selection between the LLM
segments), tokens in the prefill after compression, and the KV cache bytes after prefill.
Targets (issue 2) are checked and printed.
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


def build_artifact(ckpt: Path, method: str, ratio: float, root: Path, kv_cache: str = "fp32",
                   weights: str = "fp") -> Path:
    from vtc.export import wquant
    from vtc.export.build import BuildArgs, build

    from vtc.runtime import manifest as mf
    from vtc.runtime.errors import ArtifactError

    out = root / (f"{method}-r{ratio:g}" + ("" if kv_cache == "fp32" else f"-kv{kv_cache}")
                  + ("" if weights == "fp" else f"-w{weights}"))
    k_max = 577  # the same cache length for every variant, so decode times compare like for like
    args = BuildArgs(model=str(ckpt), method=method, ratio=ratio, output=str(out), text_budget=32,
                     max_seq_len=k_max + 32 + 64, force=True, parity_tokens=4, kv_cache=kv_cache, weights=weights)
    try:
        m = mf.load(out, check_files=False)
        head = bool(m.weights and m.weights.lm_head)
        if all(m.build_args.get(k) == getattr(args, k) for k in ("weights", "kv_cache", "max_seq_len")) \
                and head == wquant.head_int8(args):
            return out  # built by an earlier bench run with a compatible vtc and the same settings
    except ArtifactError:
        pass
    t0 = time.perf_counter()
    build(args, lambda _label: contextlib.nullcontext())
    print(f"built {out.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return out


def bench_vtc(art: Path, threads: int, runs: int, warmup: int, new_tokens: int) -> dict:
    """The artifact's p50s from vtc.runtime.profiler (the same measurement as `vtc-export profile`)."""
    from vtc.runtime.profiler import ProfileConfig, profile

    rep = profile(art, ProfileConfig(image=str(IMAGE), prompt=PROMPT, runs=runs, warmup=warmup,
                                     max_new_tokens=new_tokens + 1, threads=threads))
    m, c = rep["metrics"], rep["compression"]
    return {"ttft_ms": m["ttft_ms"]["p50"], "decode_ms": m["tpot_ms"]["p50"],
            "overhead_pct": m["runtime_overhead_pct"]["p50"], "prefill_tokens": rep["tokens"]["prompt_tokens"],
            "kv_bytes": rep["memory"]["kv_cache_prompt_bytes"], "k": c["k_visual"], "vision_ms": m["vit_time_ms"]["p50"],
            "select_ms": m["select_ms"]["p50"] if "select_ms" in m else 0.0, "stage": c["stage"]}


def paired_decode(art_a: Path, art_b: Path, threads: int, pairs: int, new_tokens: int) -> tuple[float, float]:
    """Median decode ms/token of two artifacts measured in alternation (A, B, A, B, ...), so that the
    host's load drifts over both alike: a 15% target cannot be judged from sequential runs on a noisy
    2-core machine (identical LLM graphs differed by ~11% there)."""
    from vtc.runtime.backend import get_backend
    from vtc.runtime.pipeline import VLM

    vlms = [VLM(a, backend=get_backend(threads=threads), check_files=False) for a in (art_a, art_b)]
    times = ([], [])
    for i in range(2 * pairs + 2):
        j = i % 2
        ms = vlms[j].generate(IMAGE, PROMPT, max_new_tokens=new_tokens + 1).timings_ms["decode_per_token"]
        if i >= 2:  # one warm-up each
            times[j].append(ms)
    return statistics.median(times[0]), statistics.median(times[1])


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
    ap.add_argument("--methods", default="pool,cls-attn,visionzip,tome,divprune,random,uniform,fastv,tokencarve",
                    help="methods to run at --ratio besides the uncompressed baseline")
    ap.add_argument("--ratio", default="0.25", help="ratio(s) for --methods, comma-separated (default 0.25)")
    ap.add_argument("--kv-caches", default="int8,fp8",
                    help="quantized KV caches to run with pool at the first --ratio (same run, same cache length)")
    ap.add_argument("--weights", default="int8,int4",
                    help="quantized weights (build --weights, RTN, group 128) to run uncompressed and with pool at the "
                         "first --ratio, decode interleaved against float weights")
    ap.add_argument("--workdir", type=Path, default=None, help="where artifacts go (default: the vtc cache)")
    args = ap.parse_args(argv)
    from vtc.runtime.backend import shared_thread_pool

    shared_thread_pool(args.threads)  # every graph of every artifact on one ONNX Runtime pool, as the CLI does
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vtc.export.commands.ui import quiet_transformers

    quiet_transformers()
    ckpt = bench_checkpoint()
    from vtc.export.onnx_export import EXPORT_REVISION

    root = args.workdir or ckpt.parent / f"bench-artifacts-v3-export{EXPORT_REVISION}"  # rebuilt when the graphs change
    from vtc.export import methods as registry

    wanted = [m for m in args.methods.split(",") if m]
    unknown = [m for m in wanted if m not in registry.names()]
    if unknown:
        ap.error(f"unknown methods {unknown}; available: {', '.join(registry.names())}")
    ratios = [float(r) for r in str(args.ratio).split(",") if r.strip()]
    weights = [w for w in args.weights.split(",") if w]
    variants = [("none", 1.0, "fp32", "fp")] + [(m, r, "fp32", "fp") for r in ratios for m in wanted if r != 1.0]
    variants += [("pool", ratios[0], kv, "fp") for kv in args.kv_caches.split(",") if kv]
    variants += [(m, r, "fp32", w) for w in weights for m, r in (("none", 1.0), ("pool", ratios[0]))]
    results = {}
    for method, ratio, kv, w in variants:
        art = build_artifact(ckpt, method, ratio, root, kv, w)
        name = f"vtc {method} r{ratio:g}" + ("" if kv == "fp32" else f" {kv}") + ("" if w == "fp" else f" w{w}")
        results[name] = bench_vtc(art, args.threads, args.runs, args.warmup, args.new_tokens)
    results["HF eager r1"] = bench_hf(ckpt, args.threads, args.runs, args.warmup, args.new_tokens)
    paired = {}
    for kv in [k for k in args.kv_caches.split(",") if k]:
        base = build_artifact(ckpt, "pool", ratios[0], root)
        paired[kv] = paired_decode(base, build_artifact(ckpt, "pool", ratios[0], root, kv), args.threads,
                                   max(args.runs, 8), args.new_tokens)
    for w in weights:  # decode with quantized weights vs float weights, uncompressed, interleaved
        paired[f"weights {w}"] = paired_decode(build_artifact(ckpt, "none", 1.0, root),
                                               build_artifact(ckpt, "none", 1.0, root, "fp32", w), args.threads,
                                               max(args.runs, 8), args.new_tokens)
    report(results, args, paired)
    return 0


def report(results: dict, args, paired: dict | None = None) -> None:
    print(f"\nbench-size random LLaVA, {args.threads} threads, {args.new_tokens} new tokens, "
          f"median of {args.runs} runs (CPU, ONNX Runtime)")
    base_vision = results["vtc none r1"]["vision_ms"]
    cols = ("variant", "K", "prefill tok", "compress ms", "TTFT ms", "decode ms/tok", "overhead %", "KV MiB")
    print("".join(f"{c:>14}" if i else f"{c:<22}" for i, c in enumerate(cols)))
    for name, r in results.items():
        if "k" not in r:
            print(f"{name:<22}{576:>14}{'-':>14}{'-':>14}{r['ttft_ms']:>14.1f}{r['decode_ms']:>14.2f}{'-':>14}{'-':>14}")
            continue
        compress = r["select_ms"] if r["stage"] == "llm" else r["vision_ms"] - base_vision
        print(f"{name:<22}{r['k']:>14}{r['prefill_tokens']:>14}{compress:>14.1f}{r['ttft_ms']:>14.1f}"
              f"{r['decode_ms']:>14.2f}{r['overhead_pct']:>14.2f}{r['kv_bytes'] / 2**20:>14.1f}")
    print("compress ms: vision-side methods = their vision graph minus the uncompressed one (noise ~±2 ms); "
          "in-LLM methods = the selection between LLM segments.")
    full, quarter, hf = results["vtc none r1"], results.get("vtc pool r0.25"), results["HF eager r1"]
    print("\ntargets:")
    if quarter:
        speedup = full["ttft_ms"] / quarter["ttft_ms"]
        print(f"  TTFT r0.25 (pool) vs r1.0: {speedup:.2f}x faster (target >= 2.5x): {'PASS' if speedup >= 2.5 else 'FAIL'}")
    ratio = full["decode_ms"] / hf["decode_ms"]
    print(f"  decode ms/token vtc r1.0 / HF eager: {ratio:.2f} (target <= 1.0): {'PASS' if ratio <= 1.0 else 'FAIL'}")
    for kv, (fp32_ms, kv_ms) in (paired or {}).items():
        if kv.startswith("weights "):  # issue 14's targets: int4 <= 0.5x, int8 <= 0.7x fp32 decode
            target = {"weights int4": 0.5, "weights int8": 0.7}.get(kv)
            verdict = "(no target)" if target is None else "PASS" if kv_ms / fp32_ms <= target else "FAIL"
            print(f"  decode ms/token r1.0 {kv} / fp32 weights, interleaved runs: {kv_ms:.2f} / {fp32_ms:.2f} = "
                  f"{kv_ms / fp32_ms:.2f}x (target <= {target}x): {verdict}")
            continue
        slower = kv_ms / fp32_ms
        verdict = f"{'PASS' if slower <= 1.15 else 'FAIL'}" if kv == "int8" else "(no target)"
        print(f"  decode ms/token pool {kv} KV / fp32 KV, interleaved runs: {kv_ms:.2f} / {fp32_ms:.2f} = {slower:.2f}x "
              f"(target <= 1.15x): {verdict}")
    for w in ("int8", "int4"):  # issue 14: TTFT with quantized weights no worse than with float weights
        q = results.get(f"vtc none r1 w{w}")
        if q:
            print(f"  TTFT r1.0 {w} weights / fp32: {q['ttft_ms']:.0f} / {full['ttft_ms']:.0f} ms = "
                  f"{q['ttft_ms'] / full['ttft_ms']:.2f}x (target <= 1.0x): {'PASS' if q['ttft_ms'] <= full['ttft_ms'] else 'FAIL'}")
    # issue 14's OpenVINO targets (int8 decode at or below OpenVINO int8's; int4 + pool 0.25 TTFT <= 60% of its TTFT)
    # are judged against OpenVINO measured on this machine, interleaved: `make bench-openvino` (tools/bench_openvino.py).
    print("  against OpenVINO GenAI on this machine: make bench-openvino")
    worst = max(r["overhead_pct"] for r in results.values() if "overhead_pct" in r)
    print(f"  runtime overhead outside ONNX Runtime, decode: max {worst:.2f}% (target < 3%): "
          f"{'PASS' if worst < 3 else 'FAIL'}")


if __name__ == "__main__":
    sys.exit(main())
