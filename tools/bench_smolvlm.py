"""SmolVLM at its real size on this machine: build peak RSS, TTFT at ratio 1.0 and 0.25, decode.

Writes a random-weight checkpoint with HuggingFaceTB/SmolVLM-256M-Instruct's published geometry
(vtc.export.random_idefics3.RandomIdefics3Spec.smolvlm_256m: SigLIP-B/16 at 512 px, pixel shuffle 4 -> 64 tokens
per image, SmolLM2-135M-style LM of 30 layers, vocab 49280; bfloat16 safetensors like the published files; a
trained-here BPE tokenizer, so the text is meaningless and only shapes and timings count), then for each ratio
builds it with `vtc-export build --dtype fp16 --image-splits R C` under `/usr/bin/time -v` and profiles the
artifact on ONNX Runtime's CPU provider (`vtc-export profile`). Reports, per build: wall time, peak RSS against
the memory rule of the real-scale issue (peak <= 1.3 x checkpoint weight bytes + 1 GiB), artifact bytes, visual
tokens kept, TTFT p50 and decode ms/token p50 (16 new tokens).

    python tools/bench_smolvlm.py                        # 2 x 2 tiles + global image (5 x 64 = 320 visual tokens)
    python tools/bench_smolvlm.py --image-splits 0       # the global image only (64)
    python tools/bench_smolvlm.py --method divprune --ratios 1.0,0.25
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RULE = (1.3, 1 << 30)  # peak RSS <= 1.3 x weight bytes + 1 GiB (tools/bench_scale.py)
REPO = Path(__file__).resolve().parent.parent


def _timed(cmd: list[str], log: Path) -> tuple[int, float, int, str]:
    """(exit code, wall s, peak RSS bytes, output tail) of `cmd` under /usr/bin/time -v; all output to `log`."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    log.write_text(proc.stdout + proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return proc.returncode, wall, int(rss.group(1)) * 1024 if rss else -1, (proc.stdout + proc.stderr)[-3000:]


def checkpoint(root: Path) -> Path:
    """The 256M-geometry checkpoint under `root`, written once (bfloat16, as published)."""
    from vtc.export.random_idefics3 import RandomIdefics3Spec, write_random_idefics3

    ckpt = root / "smolvlm-256m-geometry"
    if not (ckpt / "model.safetensors").is_file():
        print(f"writing {ckpt} ...", file=sys.stderr)
        tmp = root / ".smolvlm-256m-geometry.partial"
        write_random_idefics3(tmp, RandomIdefics3Spec.smolvlm_256m(), seed=0, dtype="bfloat16")
        tmp.rename(ckpt)
    return ckpt


def bench_one(ckpt: Path, root: Path, method: str, ratio: float, splits: list[int], threads: int) -> dict:
    from vtc.runtime import load_manifest

    weights = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    tag = f"{method if ratio < 1 else 'none'}-r{ratio:g}-s{'x'.join(map(str, splits))}"
    art = root / f"artifact-{tag}"
    vtc = str(Path(sys.executable).with_name("vtc-export"))
    build = [vtc]  # the 256M model is over build.LEAN_ABOVE_BYTES: the memory-lean path
    rc, wall, rss, tail = _timed([*build, "build", "--model", str(ckpt), "--dtype", "fp16", "--method", method,
                                  "--ratio", str(ratio), "--image-splits", *map(str, splits), "--output", str(art),
                                  "--force", "--max-seq-len", "2048", "--text-budget", "64"], root / f"build-{tag}.log")
    out = {"variant": tag, "checkpoint_weight_bytes": weights, "build_exit": rc, "build_wall_s": round(wall, 1),
           "build_peak_rss_bytes": rss, "rule_bytes": int(RULE[0] * weights + RULE[1])}
    if rc != 0:
        return {**out, "build_error": tail}
    m = load_manifest(art)
    out.update(artifact_bytes=sum(f["bytes"] for f in m.files.values()), k_visual=m.compression.k_visual,
               n_visual=m.compression.n_visual, parity_ok=m.parity.get("ok"))
    prof = root / f"profile-{tag}.json"
    rc, wall, rss, tail = _timed([vtc, "profile", str(art), "--runs", "3", "--warmup", "1", "--max-new-tokens", "16",
                                  "--threads", str(threads), "--json", str(prof)], root / f"profile-{tag}.log")
    if rc != 0:
        return {**out, "profile_error": tail}
    r = json.loads(prof.read_text())
    return {**out, "ttft_ms_p50": r["metrics"]["ttft_ms"]["p50"], "tpot_ms_p50": r["metrics"]["tpot_ms"]["p50"],
            "prompt_tokens": r["tokens"]["prompt_tokens"], "run_peak_rss_bytes": rss, "threads": threads}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=os.environ.get("VTC_BENCH_SMOLVLM_DIR", "artifacts/bench-smolvlm"))
    p.add_argument("--method", default="pool", help="the method at ratios below 1 (default pool)")
    p.add_argument("--ratios", default="1.0,0.25")
    p.add_argument("--image-splits", type=int, nargs="+", default=[2, 2], metavar="R C")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError:
        p.error(f"--ratios {args.ratios!r}: pass comma-separated numbers, e.g. 1.0,0.25")
    if not all(0 < r <= 1 for r in ratios):
        p.error(f"--ratios {args.ratios}: each ratio must be in (0, 1]")
    if args.threads < 1:
        p.error(f"--threads {args.threads}: pass a positive number of threads")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(root)
    results = [bench_one(ckpt, root, args.method, r, args.image_splits, args.threads) for r in ratios]
    (root / "bench-smolvlm.json").write_text(json.dumps(results, indent=2) + "\n")
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    for r in results:
        met = "met" if 0 < r["build_peak_rss_bytes"] <= r["rule_bytes"] else "NOT met"
        print(f"SmolVLM-256M geometry, {r['variant']}: weights {gib(r['checkpoint_weight_bytes'])}; build exit "
              f"{r['build_exit']}, {r['build_wall_s']} s, peak RSS {gib(r['build_peak_rss_bytes'])} (rule "
              f"{gib(r['rule_bytes'])}: {met})")
        if "ttft_ms_p50" in r:
            print(f"  {r['k_visual']} of {r['n_visual']} visual tokens, {r['prompt_tokens']} prompt tokens; TTFT p50 "
                  f"{r['ttft_ms_p50']:.0f} ms, decode p50 {r['tpot_ms_p50']:.1f} ms/token ({r['threads']} threads); "
                  f"artifact {gib(r['artifact_bytes'])}, run peak RSS {gib(r['run_peak_rss_bytes'])}")
        else:
            print(f"  failed:\n{r.get('build_error') or r.get('profile_error')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
