"""Does the profiler's p50 TTFT agree with an independent wall-clock measurement of `vtc-export run`?

Both run as real commands in their own processes, alternating in blocks so that both see the same
machine load: `vtc-export profile ART --runs K --json` (its p50 TTFT, and every run's TTFT), and K
times `vtc-export run ART --image IMG --prompt P --max-new-tokens 1 --json`, each in a fresh
interpreter that wraps `VLM.generate` with a stopwatch before calling the CLI (the runtime itself is
not modified). With one new token `generate` returns right after the first token, so the stopwatch
reads that command's time to first token without the pipeline's own timers. Also reported, paired
within each `run`: the stopwatch minus the TTFT that `run --json` reports itself.

Every `run` is the first query of a freshly loaded artifact, while the profiler's measured runs follow
its warm-up; the profiler also reports that cold first query (`cold_start.ttft_ms`), compared too.

    python tools/ttft_check.py artifacts/demo-llava-pool-r0.25 --blocks 3 --per-block 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

IMAGE = Path(__file__).resolve().parent.parent / "examples" / "shapes.png"
PROMPT = "What shapes do you see in the picture?"

STOPWATCH = textwrap.dedent("""
    import contextlib, io, json, sys, time
    from vtc.runtime import pipeline
    from vtc.export.cli import main
    walls, generate = [], pipeline.VLM.generate
    def timed(self, *a, **kw):
        t0 = time.perf_counter()
        try:
            return generate(self, *a, **kw)
        finally:
            walls.append((time.perf_counter() - t0) * 1e3)
    pipeline.VLM.generate = timed
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(sys.argv[1:])
    if rc:
        sys.exit(rc)
    print(json.dumps({"wall_ms": walls[0], "reported_ms": json.loads(buf.getvalue())["timings_ms"]["ttft"]}))
""")


def _python(args: list[str]) -> str:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:4])} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def timed_run(art: Path, image: Path, prompt: str, threads: int) -> dict:
    return json.loads(_python(["-c", STOPWATCH, "run", str(art), "--image", str(image), "--prompt", prompt,
                               "--max-new-tokens", "1", "--json", "--threads", str(threads)]).splitlines()[-1])


def profiled(art: Path, image: Path, prompt: str, threads: int, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "p.json"
        _python(["-m", "vtc.export.cli", "profile", str(art), "--image", str(image), "--prompt", prompt, "--runs",
                 str(runs), "--warmup", "1", "--max-new-tokens", "8", "--threads", str(threads), "--json", str(out)])
        return json.loads(out.read_text())


def measure(art: Path, blocks: int = 3, per_block: int = 5, image: Path = IMAGE, prompt: str = PROMPT,
            threads: int = 0) -> dict:
    walls, reported, profile_p50s, profile_ttfts, colds = [], [], [], [], []
    for _ in range(blocks):
        for _ in range(per_block):
            r = timed_run(art, image, prompt, threads)
            walls.append(r["wall_ms"])
            reported.append(r["reported_ms"])
        rep = profiled(art, image, prompt, threads, per_block)
        profile_p50s.append(rep["metrics"]["ttft_ms"]["p50"])
        profile_ttfts += [x["ttft_ms"] for x in rep["runs"]]
        colds.append(rep["cold_start"]["ttft_ms"])
    p50, wall = statistics.median(profile_ttfts), statistics.median(walls)
    return {"profile_ttft_p50_ms": p50, "profile_p50_per_invocation_ms": profile_p50s,
            "run_wall_ttft_median_ms": wall, "relative_diff": (p50 - wall) / wall,
            "run_reported_ttft_median_ms": statistics.median(reported),
            "paired_wall_minus_reported_ms": statistics.median(w - r for w, r in zip(walls, reported)),
            "profile_cold_ttft_median_ms": statistics.median(colds), "profile_cold_ttfts_ms": colds,
            "run_walls_ms": walls, "profile_ttfts_ms": profile_ttfts}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--per-block", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.10)
    args = ap.parse_args(argv)
    r = measure(args.artifact, args.blocks, args.per_block, threads=args.threads)
    ok = abs(r["relative_diff"]) <= args.tolerance
    n = args.blocks * args.per_block
    print(f"profile p50 TTFT {r['profile_ttft_p50_ms']:.2f} ms over {n} runs (per invocation: "
          f"{', '.join(f'{x:.1f}' for x in r['profile_p50_per_invocation_ms'])}); `vtc-export run` wall clock to "
          f"first token, median of {n}: {r['run_wall_ttft_median_ms']:.2f} ms; difference "
          f"{100 * r['relative_diff']:+.1f}% (tolerance {100 * args.tolerance:.0f}%): {'PASS' if ok else 'FAIL'}")
    cold = r["profile_cold_ttft_median_ms"]
    print(f"profile's cold first-query TTFT (median of {args.blocks} invocations): {cold:.2f} ms, "
          f"{100 * (cold - r['run_wall_ttft_median_ms']) / r['run_wall_ttft_median_ms']:+.1f}% vs `run`")
    print(f"paired, within each `run`: stopwatch minus the TTFT it reports itself, median "
          f"{r['paired_wall_minus_reported_ms']:.2f} ms (reported TTFT median {r['run_reported_ttft_median_ms']:.2f} ms)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
