"""`make bench` (issue 16): TTFT at ratio 1.0 vs 0.25 and KV bytes on a bench-size Qwen2.5-VL-like model.

Model: vtc.export.random_qwen.RandomQwenSpec.bench() (Qwen2_5_VLForConditionalGeneration, random weights; LLM
1024 x 8 layers, 16 heads / 2 KV heads, M-RoPE, vocab 32000; windowed ViT 640 x 8 blocks, full attention in
blocks 1, 3, 5, 7; 2x2 merger), written once to the vtc cache. Built at the static --image-size (default 448 x 448
-> 256 visual tokens) with `vtc-export build` (fp32, a text budget of 48, room for 64 new tokens, parity against HF
`generate`) uncompressed and, at --ratio, with every method the registry says applies to this architecture
(`Method.applies_to` on the adapter's VisualSpec: the methods without a [CLS] token).

Measured with vtc.runtime.profiler (the same path as `vtc-export profile`; greedy, --new-tokens decoded, EOS
ignored). The variants are interleaved: --rounds rounds, each profiling every artifact for --runs runs after one
warm-up, so that the host's load drifts over all of them alike; p50s are over the pooled runs. Reported per
variant: visual tokens kept, prefill tokens, TTFT p50 and its split (preprocess, vision encoder + compressor,
prefill + first token, of which in-LLM selection), decode ms/token p50, KV cache bytes after prefill, build wall
time and peak RSS. A markdown table to stdout, everything to --workdir/bench-qwen.json.

    python tools/bench_qwen.py                          # the bench: about 15 min on 2 cores the first time
    python tools/bench_qwen.py --methods pool --runs 1 --rounds 1 --new-tokens 4   # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from bench_smolvlm import _timed  # noqa: E402  (same /usr/bin/time -v wrapper)
PROMPT = "What shapes do you see in the picture?"
IMAGE = REPO / "examples" / "shapes.png"
TEXT_BUDGET, ROOM = 48, 64  # build --text-budget (the prompt in Qwen's template is 39 tokens), new tokens' room
# per-run profiler metrics pooled over the rounds (vtc.runtime.profiler.METRICS keys)
METRICS = ("preprocess_ms", "vit_time_ms", "prefill_time_ms", "select_ms", "ttft_ms", "tpot_ms")


def checkpoint() -> Path:
    """The bench checkpoint in the vtc cache, written once (a partial directory renamed into place)."""
    from vtc.export.demo import cache_root
    from vtc.export.random_qwen import RandomQwenSpec, write_random_qwen

    path = cache_root() / "bench-qwen2_5_vl-v1"
    if not (path / "model.safetensors").is_file():
        print(f"writing bench checkpoint to {path} ...", file=sys.stderr)
        tmp = path.with_name(f".{path.name}.partial")
        write_random_qwen(tmp, RandomQwenSpec.bench(), seed=0)
        tmp.rename(path)
    return path


def parameters(ckpt: Path) -> dict:
    """Parameter counts from the safetensors headers (no weights read): vision tower, LLM, LM head."""
    from safetensors import safe_open

    out = {"vision": 0, "llm": 0, "lm_head": 0}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                n = 1
                for d in st.get_slice(name).get_shape():
                    n *= d
                part = "vision" if ".visual." in f".{name}" else "lm_head" if name.startswith("lm_head") else "llm"
                out[part] += n
    return {**out, "total": sum(out.values())}


def applicable_methods(ckpt: Path, image_size: list[int]) -> list[str]:
    """Compressing methods whose requirements this architecture's vision side meets (what the build accepts)."""
    from transformers import AutoConfig

    from vtc.export import methods, models

    adapter = models.resolve(ckpt).with_image_size(tuple(image_size))
    spec = adapter.visual_spec(SimpleNamespace(config=AutoConfig.from_pretrained(ckpt, local_files_only=True)))
    return [m.name for m in methods.all_methods() if m.compresses and m.applies_to(spec)]


def build(ckpt: Path, root: Path, method: str, ratio: float, image_size: list[int], n_visual: int) -> dict:
    """Build one artifact with `vtc-export build` (reused when a compatible one exists); its build facts."""
    from vtc.runtime import manifest as mf
    from vtc.runtime.errors import ArtifactError

    tag = f"{method}-r{ratio:g}-{image_size[0]}x{image_size[1]}"
    art = root / tag
    facts = {"variant": tag, "method": method, "ratio": ratio, "artifact": str(art)}
    try:
        return {**facts, "build": "reused", "parity_ok": mf.load(art, check_files=False).parity.get("ok")}
    except ArtifactError:
        pass
    vtc = str(Path(sys.executable).with_name("vtc-export"))
    rc, wall, rss, tail = _timed([vtc, "build", "--model", str(ckpt), "--method", method, "--ratio", str(ratio),
                                  "--image-size", *map(str, image_size), "--text-budget", str(TEXT_BUDGET),
                                  "--max-seq-len", str(n_visual + TEXT_BUDGET + ROOM), "--output", str(art),
                                  "--force"], root / f"build-{tag}.log")
    print(f"built {tag}: exit {rc}, {wall:.0f} s, peak RSS {rss / 2**30:.2f} GiB", file=sys.stderr)
    if rc != 0:
        raise SystemExit(f"error: building {tag} failed (log: {root / f'build-{tag}.log'}):\n{tail}")
    return {**facts, "build": "built", "build_wall_s": round(wall, 1), "build_peak_rss_bytes": rss,
            "parity_ok": mf.load(art, check_files=False).parity.get("ok")}


def profile_rounds(variants: list[dict], args) -> None:
    """Profile every variant --rounds times in turn (interleaved); pool the per-run metrics into each variant."""
    from vtc.runtime.profiler import ProfileConfig, profile

    cfg = ProfileConfig(image=str(IMAGE), prompt=PROMPT, runs=args.runs, warmup=1,
                        max_new_tokens=args.new_tokens + 1, threads=args.threads)
    for v in variants:
        v["runs"] = []
    for r in range(args.rounds):
        for v in variants:
            rep = profile(Path(v["artifact"]), cfg)
            v["runs"] += rep["runs"]
            c, m = rep["compression"], rep["memory"]
            v.update(k_visual=c["k_visual"], n_visual=c["n_visual"], stage=c["stage"],
                     prefill_tokens=rep["tokens"]["prompt_tokens"], kv_prompt_bytes=m["kv_cache_prompt_bytes"],
                     kv_allocated_bytes=m["kv_cache_allocated_bytes"], host=rep["host"],
                     process_peak_rss_bytes=m["peak_rss_bytes"])  # the bench process so far (getrusage)
            print(f"round {r + 1}/{args.rounds} {v['variant']}: TTFT p50 {rep['metrics']['ttft_ms']['p50']:.0f} ms",
                  file=sys.stderr)


def summarise(v: dict) -> dict:
    """p50 (and the other profiler stats) of each metric over the pooled runs."""
    from vtc.runtime.profiler import summarize

    return {k: summarize([r[k] for r in v["runs"]]) for k in METRICS if all(r.get(k) is not None for r in v["runs"])}


def table(variants: list[dict]) -> str:
    base = variants[0]["stats"]["ttft_ms"]["p50"]
    rows = ["| variant | visual tokens | prefill tokens | TTFT p50 ms | vision ms | prefill ms | TTFT vs 1.0 | "
            "decode ms/token | KV after prefill |", "|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        s = v["stats"]
        p = {k: s[k]["p50"] for k in s}
        name = "ratio 1.0" if v["method"] == "none" else f"{v['method']} {v['ratio']:g}"
        select = f" (select {p['select_ms']:.1f})" if "select_ms" in p else ""
        rows.append(f"| {name} | {v['k_visual']} of {v['n_visual']} | {v['prefill_tokens']} | {p['ttft_ms']:.0f} | "
                    f"{p['vit_time_ms']:.0f} | {p['prefill_time_ms']:.0f}{select} | {base / p['ttft_ms']:.2f}x | "
                    f"{p['tpot_ms']:.1f} | {v['kv_prompt_bytes'] / 2**20:.2f} MiB |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--runs", type=int, default=5, help="measured runs per variant per round (default 5)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the variants (default 2)")
    ap.add_argument("--new-tokens", type=int, default=32, help=f"decoded tokens per run (at most {ROOM - 1})")
    ap.add_argument("--ratio", type=float, default=0.25, help="the compressed ratio (default 0.25)")
    ap.add_argument("--methods", default="applicable",
                    help="methods at --ratio, comma-separated, or 'applicable' (every method that applies; default)")
    ap.add_argument("--image-size", type=int, nargs=2, default=[448, 448], metavar=("H", "W"))
    ap.add_argument("--workdir", type=Path, default=None, help="where artifacts go (default: the vtc cache)")
    args = ap.parse_args(argv)
    if min(args.runs, args.rounds, args.threads) < 1 or not 1 <= args.new_tokens < ROOM:
        ap.error(f"--runs, --rounds and --threads must be at least 1 and --new-tokens in 1..{ROOM - 1}")
    from vtc.runtime.backend import shared_thread_pool

    shared_thread_pool(args.threads)  # every graph of every artifact on one ONNX Runtime pool, as the CLI does
    if not 0 < args.ratio < 1:
        ap.error(f"--ratio {args.ratio}: pass a ratio in (0, 1), e.g. 0.25")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vtc.export.commands.ui import quiet_transformers

    quiet_transformers()
    t0 = time.perf_counter()
    ckpt = checkpoint()
    params = parameters(ckpt)
    applicable = applicable_methods(ckpt, args.image_size)
    wanted = applicable if args.methods == "applicable" else [m for m in args.methods.split(",") if m]
    refused = [m for m in wanted if m not in applicable]
    if refused:
        ap.error(f"methods {refused} are not methods that apply to Qwen2.5-VL; these do: {', '.join(applicable)}")
    n_visual = (args.image_size[0] // 28) * (args.image_size[1] // 28)
    root = args.workdir or ckpt.parent / "bench-qwen-artifacts-v1"
    root.mkdir(parents=True, exist_ok=True)
    variants = [build(ckpt, root, m, r, args.image_size, n_visual)
                for m, r in [("none", 1.0)] + [(m, args.ratio) for m in wanted]]
    profile_rounds(variants, args)
    for v in variants:
        v["stats"] = summarise(v)
    print(f"\nbench-size Qwen2.5-VL-like model: {params['total'] / 1e6:.1f} M parameters (vision "
          f"{params['vision'] / 1e6:.1f} M, LLM {params['llm'] / 1e6:.1f} M, LM head {params['lm_head'] / 1e6:.1f} M); "
          f"{args.image_size[0]}x{args.image_size[1]} image -> {n_visual} visual tokens; fp32, ONNX Runtime CPU, "
          f"{args.threads} threads, {args.new_tokens} new tokens, p50 of {args.rounds} x {args.runs} runs "
          f"({args.rounds} interleaved rounds)")
    host = variants[0]["host"]
    print(f"{dt.date.today()}, {host['cpu']} ({host['cpu_count']['usable']} usable cores), onnxruntime "
          f"{host['backend_version']}; profiling process peak RSS "
          f"{max(v['process_peak_rss_bytes'] for v in variants) / 2**30:.2f} GiB\n")
    print(table(variants))
    out = root / "bench-qwen.json"
    out.write_text(json.dumps({"created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "checkpoint": str(ckpt), "parameters": params, "image_size": args.image_size,
                               "applicable_methods": applicable, "config": vars(args) | {"workdir": str(root)},
                               "wall_s": round(time.perf_counter() - t0, 1), "variants": variants},
                              indent=2, default=str) + "\n")
    print(f"\nwall {time.perf_counter() - t0:.0f} s; every run in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
