"""`vtc-export calibrate`: KV-cache statistics -> kv_scales.json for --kv-cache int8|fp8 (vtc.export.kvquant)."""

from __future__ import annotations

from pathlib import Path

from vtc.export.commands.args import BuildOptionsArgs, KvCacheArgs
from vtc.export.commands.ui import check_outputs, out, quiet_transformers, step, subcommand

OPTIONS, KV = BuildOptionsArgs(calibrate=True), KvCacheArgs(with_dtype=False)


def add_parser(subparsers):
    c = subcommand(subparsers, "calibrate", "measure KV-cache statistics and write kv_scales.json for --kv-cache int8|fp8", """
          vtc-export calibrate --ratio 0.25 --output kv_scales.json          # demo model, pool
          vtc-export calibrate --model ./llava-1.5-7b-hf --method fastv --ratio 0.25 \\
              --calib-images ./my_images --calib-prompts prompts.jsonl --output kv_scales.json
          vtc-export calibrate --model ./SmolVLM-256M-Instruct --method pool --ratio 0.25 --image-splits 2 2 \\
              --output kv_scales.json      # for: vtc-export build ... --image-splits 2 2 --kv-scales kv_scales.json
        """)
    OPTIONS.add_to_parser(c)
    c.add_argument("--output", "-o", default="kv_scales.json", metavar="FILE", help="where to write (default kv_scales.json)")
    KV.add_to_parser(c)
    return c


def run(args) -> int:
    from vtc.export.build import BuildArgs
    from vtc.export.kvquant import write_scales

    check_outputs(args.output)  # before the calibration run, not after it
    quiet_transformers()
    # The statistics are those of a quantized cache; int8 and fp8 share them (the scales file says which fits).
    bargs = BuildArgs(**OPTIONS.parse(args), **KV.parse(args), kv_cache="int8")
    path = write_scales(Path(args.output), bargs, step)
    out.print(f"kv_scales: [bold]{path}[/] (use: vtc-export build --kv-cache int8|fp8 --kv-scales {path} "
              f"--method {args.method} --ratio ...)")
    return 0
