"""`make bench-scale`: vtc at the real size of LLaVA-1.5-7B, on this machine.

Writes a random-weight checkpoint with the exact llava-hf/llava-1.5-7b-hf geometry (CLIP ViT-L/14-336:
24 layers of width 1024, 16 heads, intermediate 4096; Llama LM: 32 layers of width 4096, 32 heads,
intermediate 11008, vocab 32064, rms_norm_eps 1e-5; image_token_index 32000, vision_feature_layer -2,
strategy "default", projector gelu) stored as float16 safetensors shards, tensor by tensor (no model is
ever materialised: the shapes come from a meta-device model), then builds it with
`vtc-export build --dtype fp16` under `/usr/bin/time -v` and reports: wall time, peak RSS against the
memory rule (peak <= 1.3 x checkpoint weight bytes + 1 GiB), artifact bytes against 1.1 x the weight
bytes, the artifact's load time, and TTFT / decode ms per token where this host can run it (or what
prevents it). `--llm-layers 2` makes the cheap variant (the full vision tower, 2 LLM layers).

    python tools/bench_scale.py                      # both variants, the 2-layer one first
    python tools/bench_scale.py --llm-layers 2       # one variant
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

RULE = (1.3, 1 << 30)  # peak RSS <= 1.3 x weight bytes + 1 GiB
SHARD_BYTES = 2 << 30
IMAGE_TOKEN_ID, VOCAB = 32000, 32064
REPO = Path(__file__).resolve().parent.parent


def llava_7b_config(llm_layers: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=llm_layers, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=VOCAB, rms_norm_eps=1e-5, max_position_embeddings=4096,
                       bos_token_id=1, eos_token_id=2, pad_token_id=IMAGE_TOKEN_ID + 1)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=576)
    cfg.dtype = "float16"
    return cfg


def write_tokenizer(out: Path) -> None:
    """A word-level fast tokenizer with llava-hf's special ids: <unk> 0, <s> 1, </s> 2, <image> 32000, <pad> 32001."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, processors

    from vtc.export.random_llava import DEFAULT_WORDS
    from vtc.export.wordtok import LLAVA15_CHAT_TEMPLATE, _pre_tokenizer, _tokenizer_config

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    split, lower = _pre_tokenizer(), normalizers.Lowercase()
    for word in DEFAULT_WORDS:
        for piece, _ in split.pre_tokenize_str(lower.normalize_str(word)):
            vocab.setdefault(piece, len(vocab))
    while len(vocab) < IMAGE_TOKEN_ID:
        vocab[f"<w{len(vocab)}>"] = len(vocab)
    vocab["<image>"], vocab["<pad>"] = IMAGE_TOKEN_ID, IMAGE_TOKEN_ID + 1
    while len(vocab) < VOCAB:
        vocab[f"<w{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), _pre_tokenizer()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<unk>", "<s>", "</s>", "<image>", "<pad>")])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(tok), indent=2) + "\n")
    (out / "chat_template.jinja").write_text(LLAVA15_CHAT_TEMPLATE)


def _init(name: str, shape, dtype, gen):
    import torch

    if len(shape) == 1 and name.endswith(".bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)  # HF's initializer_range


def write_checkpoint(out: Path, llm_layers: int) -> int:
    """Write the checkpoint into `out` (a temporary sibling first, renamed when complete); its weight bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

    cfg = llava_7b_config(llm_layers)
    with torch.device("meta"):
        meta = LlavaForConditionalGeneration(cfg)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shards, current, size, total = [], {}, 0, 0
    named = [(n, t) for n, t in meta.state_dict().items() if t.is_floating_point()]
    for i, (name, t) in enumerate(named):
        current[name] = _init(name, tuple(t.shape), torch.float16, gen)
        size += current[name].numel() * 2
        if size >= SHARD_BYTES or i == len(named) - 1:
            shards.append(current)
            path = tmp / f"model-{len(shards):05d}.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
            total += size
            print(f"  {path.name}: {size / 2**30:.2f} GiB ({i + 1}/{len(named)} tensors)", file=sys.stderr)
            current, size = {}, 0
    n = len(shards)
    weight_map = {name: f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k, s in enumerate(shards) for name in s}
    for k in range(n):
        (tmp / f"model-{k + 1:05d}.safetensors").rename(tmp / f"model-{k + 1:05d}-of-{n:05d}.safetensors")
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(tmp)
    (tmp / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                            "pad_token_id": IMAGE_TOKEN_ID + 1}))
    write_tokenizer(tmp)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                   tokenizer=PreTrainedTokenizerFast.from_pretrained(tmp), patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(tmp)
    tmp.rename(out)
    return total


def _weight_bytes(ckpt: Path) -> int:
    return sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))


def _timed(cmd: list[str], log: Path | None = None) -> tuple[int, float, int, str]:
    """(exit code, wall s, peak RSS bytes, output tail) of `cmd` under /usr/bin/time -v; the whole output
    goes to `log` if given."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return proc.returncode, wall, int(rss.group(1)) * 1024 if rss else -1, (proc.stdout + proc.stderr)[-3000:]


def bench(llm_layers: int, root: Path, threads: int) -> dict:
    from vtc.runtime import load_manifest

    ckpt = root / f"llava-1.5-7b-geometry-llm{llm_layers}"
    if not (ckpt / "model.safetensors.index.json").is_file():
        print(f"writing {ckpt} ...", file=sys.stderr)
        t0 = time.perf_counter()
        write_checkpoint(ckpt, llm_layers)
        print(f"  written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    weights = _weight_bytes(ckpt)
    art = root / f"artifact-llm{llm_layers}-fp16"
    vtc = str(Path(sys.executable).with_name("vtc-export"))
    rc, wall, rss, tail = _timed([vtc, "build", "--model", str(ckpt), "--dtype", "fp16", "--ratio", "1.0",
                                  "--output", str(art), "--force", "--max-seq-len", "1024", "--text-budget", "64"],
                                 log=root / f"build-llm{llm_layers}.log")
    out = {"llm_layers": llm_layers, "checkpoint_weight_bytes": weights, "build_exit": rc, "build_wall_s": round(wall, 1),
           "build_peak_rss_bytes": rss, "rule_bytes": int(RULE[0] * weights + RULE[1])}
    if rc != 0:
        out["build_error"] = tail
        return out
    m = load_manifest(art)
    out["artifact_bytes"] = sum(f["bytes"] for f in m.files.values())
    out["parity"] = {k: m.parity.get(k) for k in ("ok", "scope", "graph_dtype")}
    out["load"] = _load_time(art, threads, weights)
    out["latency"] = _latency(art, threads, weights)
    return out


def _fits(weights: int) -> str | None:
    """Why ONNX Runtime cannot open the artifact on this host (None: it can): its CPU provider runs fp16 graphs
    in float32, so it needs about 2x the fp16 weight bytes."""
    from vtc.export.build import _available_bytes

    avail = _available_bytes()  # MemAvailable: free memory plus the page cache the kernel can drop
    if 2 * weights > 0.9 * avail:
        return (f"ONNX Runtime's CPU provider computes fp16 graphs in float32: about {2 * weights / 2**30:.1f} GiB of "
                f"weights, this host has {avail / 2**30:.1f} GiB available")
    return None


def _load_time(art: Path, threads: int, weights: int) -> dict:
    """`run`'s load checks (manifest + file sizes, no hashing) and, where the sessions fit, opening the artifact
    as `run` does (manifest + size checks + sessions), each in a fresh process."""
    check = ("import time,sys; t=time.perf_counter(); from vtc.runtime import load_manifest; "
             "load_manifest(sys.argv[1], check_files='sizes'); print('OPEN_S', time.perf_counter()-t)")
    rc, wall, rss, tail = _timed([sys.executable, "-c", check, str(art)])
    found = re.search(r"OPEN_S ([0-9.]+)", tail)
    out = {"manifest_and_size_checks_s": round(float(found.group(1)), 3) if found else None,
           **({"error": tail} if rc else {})}
    why = _fits(weights)
    if why:
        return {**out, "open": {"skipped": why}}
    code = ("import time,sys; t=time.perf_counter(); from vtc.runtime import VLM, get_backend; "
            f"VLM(sys.argv[1], backend=get_backend(threads={threads})); print('OPEN_S', time.perf_counter()-t)")
    rc, wall, rss, tail = _timed([sys.executable, "-c", code, str(art)])
    found = re.search(r"OPEN_S ([0-9.]+)", tail)
    return {**out, "open_s": round(float(found.group(1)), 2) if found else None, "peak_rss_bytes": rss,
            **({"error": tail} if rc else {})}


def _latency(art: Path, threads: int, weights: int) -> dict:
    """TTFT and decode through `vtc-export profile` where the runtime fits in memory: ONNX Runtime's CPU
    provider runs fp16 graphs in float32, so it needs about 2x the fp16 weight bytes."""
    why = _fits(weights)
    if why:
        return {"skipped": why}
    prof = art.parent / f"{art.name}.profile.json"
    rc, wall, rss, tail = _timed([str(Path(sys.executable).with_name("vtc-export")), "profile", str(art), "--runs", "3",
                                  "--warmup", "1", "--max-new-tokens", "16", "--threads", str(threads),
                                  "--json", str(prof)])
    if rc != 0:
        return {"exit": rc, "error": tail}
    r = json.loads(prof.read_text())
    return {"ttft_ms_p50": r["metrics"]["ttft_ms"]["p50"], "tpot_ms_p50": r["metrics"]["tpot_ms"]["p50"],
            "prompt_tokens": r["tokens"]["prompt_tokens"], "peak_rss_bytes": rss, "threads": threads}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llm-layers", type=int, action="append", help="2 and/or 32 (default: both, 2 first)")
    p.add_argument("--root", default=os.environ.get("VTC_BENCH_SCALE_DIR", "artifacts/bench-scale"))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    bad = [n for n in args.llm_layers or [] if not 1 <= n <= 32]
    if bad:
        p.error(f"--llm-layers {bad[0]}: LLaVA-1.5-7B has 32 LLM layers; pass 1..32 (2 and 32 are the reported variants)")
    if args.threads < 1:
        p.error(f"--threads {args.threads}: pass a positive number of threads")
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    results = [bench(n, root, args.threads) for n in (args.llm_layers or [2, 32])]
    (root / "bench-scale.json").write_text(json.dumps(results, indent=2) + "\n")
    for r in results:
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        print(f"LLaVA-1.5-7B geometry, {r['llm_layers']} LLM layers: weights {gib(r['checkpoint_weight_bytes'])}; build "
              f"exit {r['build_exit']}, {r['build_wall_s']} s, peak RSS {gib(r['build_peak_rss_bytes'])} (rule "
              f"{gib(r['rule_bytes'])}: {'met' if 0 < r['build_peak_rss_bytes'] <= r['rule_bytes'] else 'NOT met'})")
        if "artifact_bytes" in r:
            ratio = r["artifact_bytes"] / r["checkpoint_weight_bytes"]
            print(f"  artifact {gib(r['artifact_bytes'])} = {ratio:.3f} x weights (target <= 1.1: "
                  f"{'met' if ratio <= 1.1 else 'NOT met'}); parity {r['parity']}; open {r['load']}")
            print(f"  latency: {r['latency']}")
        else:
            print(f"  build failed:\n{r.get('build_error', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
