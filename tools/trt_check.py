"""Check the whole TensorRT path on a GPU host that has TensorRT, and print a report (markdown).

    python tools/trt_check.py                                   # demo model, pool and fastv at 0.25
    python tools/trt_check.py --model ~/llava-1.5-7b-hf --methods pool,cls-attn --precision fp16
    python tools/trt_check.py --bench --out trt-report.md       # the bench-size random LLaVA (576 tokens)

Per method: build the ONNX artifact (PyTorch parity included) -> lint -> engines on this GPU
(`vtc-export engine`) -> Polygraphy comparison of every graph, ONNX Runtime (CPU) vs TensorRT, on
feeds recorded from a real generation -> greedy generation on both backends (tokens equal?) ->
profile: TTFT and decode ms/token (median of --runs), GPU ms per graph call, engine sizes, device memory.
Where TensorRT, cuda-python or the GPU is missing it prints what to install and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path

IMAGE = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"
PROMPT = "What shapes do you see in the picture?"


def environment() -> dict:
    """Fails (BackendError) before anything is built when TensorRT, cuda-python or the GPU is missing."""
    import onnxruntime as ort
    import polygraphy

    from vtc.export.tensorrt import require_tensorrt
    from vtc.runtime.trt_backend import device_info

    trt = require_tensorrt()
    dev = device_info()
    return {"host": f"{platform.node()} ({platform.machine()})", "python": platform.python_version(),
            "tensorrt": trt.__version__, "gpu": dev.name, "compute capability": dev.compute_capability,
            "GPU memory": f"{dev.total_memory / 2**30:.1f} GiB", "polygraphy": polygraphy.__version__,
            "onnxruntime": f"{ort.__version__} ({', '.join(ort.get_available_providers())})"}


def quiet(_label):
    return contextlib.nullcontext()


def build(model: str | None, method: str, ratio: float, root: Path, bench: bool) -> Path:
    """The ONNX artifact (parity against PyTorch included); the demo and bench models split in-LLM
    methods at their default layer 2."""
    from vtc.export.build import BuildArgs, build as build_artifact

    if bench:
        sys.path.insert(0, str(Path(__file__).parent))
        from bench import bench_checkpoint

        model = str(bench_checkpoint())
    big = bench or model is not None
    args = BuildArgs(model=model, method=method, ratio=ratio, output=str(root / f"{method}-r{ratio:g}"), force=True,
                     max_seq_len=1024 if big else 256, text_budget=64 if big else 48)
    return build_artifact(args, quiet).path


def generate(art: Path, backend, runs: int, tokens: int) -> dict:
    """Greedy, EOS ignored, `tokens` new tokens; medians over `runs` after one warm-up."""
    from vtc.runtime.pipeline import VLM

    vlm = VLM(art, backend=backend)
    pixels, prompt = vlm.prepare_image(IMAGE), vlm.prepare_prompt(PROMPT)
    results = [vlm.generate_from(pixels, prompt, max_new_tokens=tokens, ignore_eos=True) for _ in range(runs + 1)][1:]
    t = [r.timings_ms for r in results]
    sessions = [vlm.vision, *[s.session for s in vlm.lm.segments]] + ([vlm.lm.select] if vlm.lm.select else [])
    gpu = {s.spec.file: 1e3 * s.gpu_seconds / max(s.calls, 1) for s in sessions if hasattr(s, "gpu_seconds")}
    return {"tokens": results[0].token_ids, "ttft_ms": statistics.median(x["ttft"] for x in t),
            "decode_ms": statistics.median(x["decode_per_token"] for x in t), "gpu_ms_per_call": gpu}


def check_method(args, method: str, root: Path) -> dict:
    from vtc.export.compare import TOLERANCES, compare_graph, record_feeds
    from vtc.export.lint import lint_artifact
    from vtc.export.tensorrt import EngineOptions, build_engines_in_place
    from vtc.runtime import manifest as mf
    from vtc.runtime.backend import get_backend
    from vtc.runtime.trt_backend import import_cudart

    row: dict = {"method": method}
    t0 = time.perf_counter()
    art = build(args.model, method, args.ratio, root, args.bench)
    row["onnx build s"] = time.perf_counter() - t0
    report = lint_artifact(art)
    row["lint"] = "ok" if report.ok else "; ".join(f.line() for f in report.errors[:3])
    t0 = time.perf_counter()
    info = build_engines_in_place(art, EngineOptions(precision=args.precision, workspace_gb=args.workspace), quiet)
    row["engine build s"] = time.perf_counter() - t0
    row["engines MiB"] = {g: (art / e["file"]).stat().st_size / 2**20 for g, e in info.graphs.items()}
    m = mf.load(art)
    atol, rtol = TOLERANCES[args.precision]
    feeds = record_feeds(art, str(IMAGE), PROMPT, decode_steps=2)
    backends, names = [get_backend("onnxruntime"), get_backend("tensorrt")], ["ort", "tensorrt"]
    row["compare"] = [r for g, f in feeds.items()
                      for r in compare_graph(art, m.graphs[g], g, f, backends, names, atol, rtol)]
    ort_run = generate(art, get_backend("onnxruntime"), args.runs, args.tokens)
    trt_run = generate(art, get_backend("tensorrt"), args.runs, args.tokens)
    row["ort"], row["trt"] = ort_run, trt_run
    same = sum(a == b for a, b in zip(ort_run["tokens"], trt_run["tokens"]))
    row["greedy tokens equal"] = f"{same}/{len(ort_run['tokens'])}"
    free, total = import_cudart().cudaMemGetInfo()[1:]
    row["device memory used GiB"] = (total - free) / 2**30
    return row


def print_report(env: dict, rows: list, args) -> str:
    lines = ["# vtc TensorRT check", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in env.items()]
    lines += ["", f"precision {args.precision}, ratio {args.ratio}, {args.tokens} greedy tokens, median of {args.runs} runs",
              "", "| method | lint | ONNX build s | engine build s | engines MiB | greedy tokens equal (ORT vs TRT) | "
              "TTFT ms ORT / TRT | decode ms/token ORT / TRT | GPU ms per call | device memory GiB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | FAILED: {r['error']} | | | | | | | | |")
            continue
        mib = ", ".join(f"{g} {v:.1f}" for g, v in r["engines MiB"].items())
        gpu = ", ".join(f"{g} {v:.2f}" for g, v in r["trt"]["gpu_ms_per_call"].items())
        lines.append(f"| {r['method']} | {r['lint']} | {r['onnx build s']:.1f} | {r['engine build s']:.1f} | {mib} | "
                     f"{r['greedy tokens equal']} | {r['ort']['ttft_ms']:.1f} / {r['trt']['ttft_ms']:.1f} | "
                     f"{r['ort']['decode_ms']:.2f} / {r['trt']['decode_ms']:.2f} | {gpu} | {r['device memory used GiB']:.2f} |")
    lines += ["", "| method | graph | output | feeds | max-abs | cosine | ok |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        for c in r.get("compare", []):
            lines.append(f"| {r['method']} | {c['graph']} | {c['output']} | {c['feeds']} | {c['max_abs']:.2e} | "
                         f"{c['cosine']:.6f} | {'yes' if c['ok'] and c['polygraphy_ok'] else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR", help="HF LLaVA checkpoint (default: the built-in demo model)")
    p.add_argument("--bench", action="store_true", help="use the bench-size random LLaVA (tools/bench.py)")
    p.add_argument("--methods", default="pool,fastv", help="comma-separated methods (default pool,fastv)")
    p.add_argument("--ratio", type=float, default=0.25)
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--workspace", type=float, metavar="GB")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--workdir", default="artifacts/trt-check", metavar="DIR")
    p.add_argument("--out", metavar="FILE.md", help="also write the report here")
    args = p.parse_args()
    from vtc.runtime.errors import VtcError

    try:
        env = environment()
    except VtcError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        print(f"checking {method} ...", file=sys.stderr)
        try:
            rows.append(check_method(args, method, root))
        except VtcError as e:  # one method failing must not hide the others' results
            rows.append({"method": method, "error": " ".join(str(e).split())})
    text = print_report(env, rows, args)
    if args.out:
        Path(args.out).write_text(text)
    ok = all("error" not in r and r["lint"] == "ok" and all(c["ok"] and c["polygraphy_ok"] for c in r["compare"])
             for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
