"""`vtc-export engine`: TensorRT engines for this GPU into an existing artifact (export on a workstation,
build on the device): vtc.export.tensorrt.build_engines_in_place."""

from __future__ import annotations

from pathlib import Path

from vtc.export.commands.args import EngineArgs
from vtc.export.commands.ui import check_outputs, out, step, subcommand

ENGINE = EngineArgs(with_backend=False)


def add_parser(subparsers):
    e = subcommand(subparsers, "engine", "build TensorRT engines for this GPU into an existing artifact (run it on the device)", """
          vtc-export engine artifacts/demo-llava-pool-r0.25             # fp16 engines, one per graph
          vtc-export engine ART --precision fp32 --workspace 4 --timing-cache ~/.cache/vtc/orin.cache
          vtc-export engine ART --builder-optimization-level 5       # slower build, maybe faster engine
        """)
    e.add_argument("artifact", metavar="DIR")
    ENGINE.add_to_parser(e)
    return e


def run(args) -> int:
    from vtc.export.tensorrt import build_engines_in_place, check_backend
    from vtc.runtime.units import format_bytes

    opts = check_backend("tensorrt", ENGINE.given(args))  # fails at once without TensorRT
    check_outputs(args.timing_cache)  # updated after the build: writable now
    art = Path(args.artifact)
    info = build_engines_in_place(art, opts, step)
    out.print(f"engines: TensorRT {info.tensorrt_version} on {info.device} (compute capability "
              f"{info.compute_capability}), {info.precision}")
    for name, entry in info.graphs.items():
        size = format_bytes((art / entry["file"]).stat().st_size, "MiB")
        out.print(f"  {name:<10} {entry['file']:<24} {size:>12}  profiles {entry['profiles']}")
    out.print(f"next: vtc-export run {args.artifact} --backend tensorrt --image IMG --prompt \"...\"")
    return 0
