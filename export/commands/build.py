"""`vtc-export build`: checkpoint + compression method -> validated ONNX artifact (vtc.export.build)."""

from __future__ import annotations

from vtc.export.commands.args import BuildOptionsArgs, EngineArgs, KvCacheArgs, WeightsArgs
from vtc.export.commands.ui import err, out, quiet_transformers, step, subcommand

OPTIONS, KV, WEIGHTS, ENGINE = BuildOptionsArgs(), KvCacheArgs(), WeightsArgs(), EngineArgs()


def add_parser(subparsers):
    p = subcommand(subparsers, "build", "export a checkpoint with a compression method to a validated ONNX artifact", """
          vtc-export build --ratio 0.25                       # built-in demo model (trained on synthetic shapes)
          vtc-export build --model ./llava-1.5-7b-hf --method cls-attn --ratio 0.25 --output out/llava-cls
          vtc-export build --model ./llava-1.5-7b-hf --ratio 1.0   # uncompressed baseline
          vtc-export build --method pool --method-opt window=3  # explicit 3x3 pooling window
          vtc-export build --ratio 0.25 --kv-cache int8          # INT8 KV cache, calibrated on the bundled photos
          vtc-export build --kv-cache fp8 --kv-scales kv_scales.json
          vtc-export build --ratio 0.25 --weights int8                 # int8 weights, one scale per output channel
          vtc-export build --method fastv --ratio 0.25 --weights int4 --weights-algo awq --kv-cache int8
          vtc-export build --ratio 0.25 --backend tensorrt --precision fp16   # + TensorRT engines (GPU host)
          vtc-export build --model ./SmolVLM-256M-Instruct --method divprune --image-splits 2 2   # 4 tiles + global
          vtc-export build --model ./Qwen2.5-VL-3B-Instruct --method divprune --image-size 448 448   # 256 -> 64 tokens
        """)
    for group in (OPTIONS, KV, WEIGHTS, ENGINE):
        group.add_to_parser(p)
    return p


def run(args) -> int:
    from vtc.export.build import BuildArgs, build
    from vtc.export.demo import DEMO_NOTICE
    from vtc.runtime.units import format_bytes

    # engine = only the engine flags given: build.prepare (tensorrt.check_backend) refuses them without
    # --backend tensorrt and checks that TensorRT imports, before any export work
    bargs = BuildArgs(**OPTIONS.parse(args), **KV.parse(args), **WEIGHTS.parse(args), **ENGINE.parse(args))
    quiet_transformers()
    if args.model is None:
        err.print(f"[yellow]note:[/] no --model given: using the built-in {DEMO_NOTICE}.")
    built = build(bargs, step)
    m = built.manifest
    c = m.compression
    out.print(f"\nartifact: [bold]{built.path}[/]")
    out.print(f"visual tokens kept: [bold]{c.k_visual} of {c.n_visual}[/] ({c.method}, ratio {c.ratio:g})")
    for name, meta in m.files.items():
        out.print(f"  {name:<28} {format_bytes(meta['bytes']):>10}")
    out.print(f"  total {format_bytes(sum(f['bytes'] for f in m.files.values())):>32}")
    p = m.parity
    tok = p["greedy_tokens"]
    if tok["equal"]:
        tokens = f"{p['new_tokens']} greedy tokens equal"
    else:  # parity passes a mismatch at a near-tie of the reference (or under a quantized KV cache): vtc.export.parity
        tie = f", a near-tie: the reference's top-2 margin {tok['reference_margin']:.3g}" if tok.get("near_tie") else ""
        tokens = f"the first {tok['first_mismatch']} of {p['new_tokens']} greedy tokens equal{tie}"
    out.print(f"parity vs PyTorch: {'[green]ok[/]' if p['ok'] else '[red]FAILED[/]'} "
              f"(prefill logits max-abs {p['graphs']['llm_prefill']['max_abs']:.2e}, {tokens})")
    if p.get("scope", {}).get("llm", "full") != "full":
        from rich.markup import escape

        out.print(f"[yellow]note:[/] parity checked LLM {escape(p['scope']['llm'])}")
    sel = p.get("selection", {})
    if "reference" in sel:  # parity.check re-ran the reference on the artifact's own in-LLM selection
        out.print(f"[yellow]note:[/] the artifact's selection differs from PyTorch's in {sel['differing']} of "
                  f"{sel['kept']} kept tokens (near-ties under the {p['kv_dtype']} KV cache / {p['graph_dtype']} "
                  "graphs); the logits were checked against PyTorch run on the artifact's selection")
    if built.lint is not None:
        from vtc.export.report import print_lint

        print_lint(out, built.lint)
    if built.demo:
        from vtc.export.demo import DEMO_QUESTION

        out.print(f"[yellow]{DEMO_NOTICE}.[/]")
        out.print(f"next: vtc-export run {built.path} --image examples/shapes.png --prompt \"{DEMO_QUESTION}\"")
    else:
        out.print(f"next: vtc-export run {built.path} --image IMG --prompt \"...\"")
    return 0
