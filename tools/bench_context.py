"""`make bench` (part): decode cost follows the context, not the cache the artifact was built for.

The built-in demo model is built twice, identical but for --max-seq-len (512 and 8192), and the same
64-token generation is profiled on both in interleaved rounds (A, B, A, B, ...: slow drifts of a shared
machine hit both alike). Reported: TPOT p50 of each (vtc.runtime.profiler, as `vtc-export profile`),
their ratio, and the KV cache capacity each ends with. Target (issue 13): the 8192 build within 10%
of the 512 build. Before capacity buckets (vtc.runtime.kv_cache) decode attended over the whole
buffer: 2.8-3.7x slower at 8192.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

SEQ_LENS = (512, 8192)
TARGET = 1.10


def build(seq: int, root: Path) -> Path:
    from vtc.export.build import BuildArgs, build as run_build
    from vtc.runtime import manifest as mf
    from vtc.runtime.errors import ArtifactError

    out = root / f"demo-none-seq{seq}"
    try:
        m = mf.load(out, check_files=False)
        if m.text.max_seq_len == seq:
            return out
    except ArtifactError:
        pass
    run_build(BuildArgs(method="none", ratio=1.0, output=str(out), max_seq_len=seq, force=True, parity_tokens=4),
              lambda _label: contextlib.nullcontext())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="artifacts/bench-context", help="where the two artifacts are built")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--runs", type=int, default=8, help="profiled runs per artifact per round (default 8)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    for flag in ("rounds", "runs", "new_tokens", "threads"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: pass a positive number")
    from vtc.runtime.backend import shared_thread_pool

    shared_thread_pool(args.threads)  # every graph of every artifact on one ONNX Runtime pool, as the CLI does

    from vtc.export.commands.ui import quiet_transformers
    from vtc.runtime import profiler

    quiet_transformers()
    root = Path(args.root)
    arts = {seq: build(seq, root) for seq in SEQ_LENS}
    cfg = profiler.ProfileConfig(image=str(Path(__file__).resolve().parent.parent / "examples" / "shapes.png"),
                                 prompt="what color is the circle?", raw=False, runs=args.runs, warmup=1,
                                 max_new_tokens=args.new_tokens, threads=args.threads)
    tpot = {seq: [] for seq in SEQ_LENS}
    capacity = {}
    for r in range(args.rounds):
        for seq, art in arts.items():
            opened = profiler.open_artifact(art, cfg)
            report = profiler.profile(art, cfg, opened=opened)
            tpot[seq].append(report["metrics"]["tpot_ms"]["p50"])
            capacity[seq] = report["memory"]["kv_cache_allocated_bytes"]
            print(f"round {r + 1}: max_seq_len {seq:>5}: TPOT p50 {tpot[seq][-1]:.3f} ms", file=sys.stderr)
    med = {seq: statistics.median(v) for seq, v in tpot.items()}
    ratio = med[8192] / med[512]
    print(f"decode vs --max-seq-len (demo model, {args.new_tokens} new tokens, {args.rounds} interleaved rounds x "
          f"{args.runs} runs, {args.threads} threads):")
    for seq in SEQ_LENS:
        print(f"  max_seq_len {seq:>5}: TPOT p50 {med[seq]:.3f} ms (rounds: {', '.join(f'{x:.3f}' for x in tpot[seq])}); "
              f"KV cache allocated {capacity[seq] / 2**10:.0f} KiB")
    print(f"  8192 / 512 = {ratio:.3f}x (target <= {TARGET:.2f}x): {'met' if ratio <= TARGET else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
