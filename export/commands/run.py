"""`vtc-export run`: answer a question about an image with a built artifact (vtc.runtime; no torch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vtc.export.commands.args import RuntimeBackendArgs
from vtc.export.commands.ui import check_outputs, err, subcommand

BACKEND = RuntimeBackendArgs()


def add_parser(subparsers):
    r = subcommand(subparsers, "run", "answer a question about an image with a built artifact (no torch needed)", """
          vtc-export run artifacts/demo-llava-pool-r0.25 --image photo.jpg --prompt "What is in the image?"
          vtc-export run ART --image photo.jpg --prompt "USER: <image>\\nDescribe it. ASSISTANT:" --raw
          vtc-export run ART --image photo.jpg --prompt "Describe it." --temperature 0.7 --seed 1 --json
          vtc-export run ART --image photo.jpg --prompt "Describe it." --overlay kept.png
        """)
    r.add_argument("artifact", metavar="DIR")
    r.add_argument("--image", required=True, metavar="IMG")
    r.add_argument("--prompt", required=True, metavar="TEXT")
    r.add_argument("--raw", action="store_true", help="use the prompt verbatim (it must contain <image>)")
    r.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    r.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    r.add_argument("--top-p", type=float, default=1.0, metavar="P")
    r.add_argument("--seed", type=int, default=0, metavar="S")
    BACKEND.add_to_parser(r)
    r.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    r.add_argument("--overlay", metavar="PNG", help="save the image with kept patches highlighted, pruned ones dimmed")
    return r


def run(args) -> int:
    from vtc.runtime.pipeline import VLM
    from vtc.runtime.preprocess import load_image
    from vtc.runtime.sampling import SamplingConfig

    # every flag, the image and the --overlay path first: a bad one fails before the artifact loads
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    check_outputs(args.overlay)
    backend = BACKEND.parse(args)  # --threads: 0 or 1..usable cores
    image = load_image(args.image)  # size bounds checked on the header, before the decode
    vlm = VLM(Path(args.artifact), backend=backend)
    if getattr(backend, "fallback", None):
        err.print(f"[yellow]note:[/] {backend.fallback}")
    on_text = None if args.json else (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    res = vlm.generate(image, args.prompt, raw=args.raw, max_new_tokens=args.max_new_tokens,
                       sampling=sampling, on_text=on_text)
    c = vlm.manifest.compression
    if args.overlay:
        from vtc.runtime import overlay

        overlay.save(Path(args.overlay), vlm.preprocessor.view(image), c.grid, res.token_map, res.kept_indices, c.has_cls)
    if args.json:
        print(json.dumps({"text": res.text, "token_ids": res.token_ids, "stop_reason": res.stop_reason,
                          "visual_tokens": _visual_tokens(c, res), "prompt_tokens": res.prompt_tokens,
                          "timings_ms": {k: round(v, 3) for k, v in res.timings_ms.items()}}))
        return 0
    t = res.timings_ms
    print()
    err.print(f"[dim]{len(res.token_ids)} tokens ({res.stop_reason}); visual tokens {c.k_visual}/{c.n_visual} "
              f"({c.method}); TTFT {t['ttft']:.1f} ms (vision {t['vision']:.1f}, prefill {t['prefill']:.1f}); "
              f"decode {t['decode_per_token']:.2f} ms/token[/]")
    if vlm.manifest.model.demo:
        err.print("[dim]demo model: it knows only synthetic coloured shapes (colour, shape, presence, position, count, "
                  "left/above questions).[/]")
    return 0


def _visual_tokens(c, res) -> dict:
    """The kept visual tokens for `run --json`: indices, grid positions, and merges."""
    cols = c.grid[1]

    def where(i: int):
        j = i - 1 if c.has_cls else i
        return "cls" if j < 0 else [j // cols, j % cols]

    groups: dict[int, list[int]] = {}
    for src, dst in enumerate(res.token_map):
        if dst >= 0:
            groups.setdefault(dst, []).append(src)
    return {"total": c.n_visual, "kept": c.k_visual, "method": c.method, "grid": c.grid, "has_cls": c.has_cls,
            "kept_indices": res.kept_indices, "kept_positions": [where(i) for i in res.kept_indices],
            "merged": {str(k): v for k, v in sorted(groups.items()) if len(v) > 1},
            "dropped": sum(1 for d in res.token_map if d < 0)}
