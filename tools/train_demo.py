"""Train vtc's built-in demo model from scratch on the synthetic visual-QA task (CPU, about 50 minutes on 2 cores).

    python tools/train_demo.py --out export/data/demo-model            # what `make train-demo` runs
    python tools/train_demo.py --out /tmp/demo --steps 200 --eval 120  # a quick look at the learning curve

The model is a LLaVA-1.5-architecture checkpoint of real HF classes (LlavaForConditionalGeneration: a
CLIP vision tower, LLaVA's 2-layer GELU projector, a Llama LM with grouped-query attention), trained end to
end from random initialisation on vtc.runtime.synthetic_vqa: coloured shapes on a 4 x 4 grid, six question
types. Images are 128 px with 8 px patches, so every image gives 16 x 16 = 256 visual tokens and each grid
cell is 4 x 4 patches (pooling at 0.11 keeps one token per cell, at 0.25 four).

Every training sequence is one image and one question of each type in a random order, packed: the image
prefix of the checkpoint's LLaVA-1.5 prompt ("<s> USER: <image>") once, then six turns "{q} ASSISTANT: {a}</s>",
each with position ids restarting after the image and an attention mask that lets it see only the image and
itself. Every turn is therefore exactly the single-question prompt `vtc-export run`/`eval` build, six answers
of supervision cost one vision forward, and no turn can copy its answer from another turn's text. Loss is on
the answer tokens and their </s> only.

Deterministic: the scenes come from a seeded generator (training scenes from `--seed`, the held-out
questions from a different stream, `--eval-seed`), torch is seeded and runs with a fixed thread count.
The output is written to a temporary directory next to `--out` and moved into place when complete; the
model card (README.md) records the command, seed, sizes, wall time and the final held-out metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

VERSION = 2  # the demo model's version (vtc.export.demo.DEMO_VERSION)
IMAGE_SIZE, PATCH = 128, 8
IMAGE_TOKEN_ID = 4  # vtc.export.wordtok's fixed id for <image>
EOS_ID, PAD_ID = 2, 0


def vocabulary() -> list[str]:
    """Every word the task and the chat template use, plus general words so other prompts tokenize too."""
    from vtc.export.random_llava import DEFAULT_WORDS
    from vtc.runtime import synthetic_vqa as sv

    task = ["user", "assistant", ":", "?", ".", ",", "what", "color", "is", "the", "shape", "object", "there",
            "a", "where", "how", "many", "shapes", "are", "left", "of", "above", "yes", "no", "top", "bottom",
            "right"]
    return sorted(set(task) | set(sv.COLORS) | set(sv.SHAPES) | set(sv.NUMBERS) | set(DEFAULT_WORDS))


def build_model(args, vocab_size: int):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                              num_hidden_layers=args.vision_layers, num_attention_heads=args.vision_heads,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=args.vision_hidden)
    text = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=vocab_size,
                       max_position_embeddings=1024, bos_token_id=1, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                       initializer_range=0.02)
    side = IMAGE_SIZE // PATCH
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                      vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=side * side)
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model


class Encoder:
    """Token ids in the checkpoint's LLaVA-1.5 format, built piecewise (word-level tokens are context-free)."""

    def __init__(self, tokenizer_json: Path, n_image_tokens: int):
        from tokenizers import Tokenizer

        self.tok, self.n_image = Tokenizer.from_file(str(tokenizer_json)), n_image_tokens

    def ids(self, text: str) -> list[int]:
        out = self.tok.encode(text, add_special_tokens=False).ids
        if 3 in out:  # <unk>
            raise SystemExit(f"train_demo: {text!r} has a word outside the demo vocabulary (a vtc bug).")
        return out

    def first_turn(self, question: str) -> list[int]:
        """What the runtime's chat template + tokenizer produce for one image and one question."""
        ids = [1] + self.ids(f"USER: <image>\n{question} ASSISTANT:")
        at = ids.index(IMAGE_TOKEN_ID)
        return ids[:at] + [IMAGE_TOKEN_ID] * self.n_image + ids[at + 1:]

    def packed(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int], list[int], list[int], list[list[int]]]:
        """One image and several independent questions about it, packed into one sequence.

        The image prefix ("<s> USER: <image>...") comes once; each turn is the rest of its own first-turn prompt,
        the answer and </s>, with position ids that restart right after the image, and sees only the prefix and
        itself (`block_mask`). So every turn is exactly the single-question prompt `vtc-export run`/`eval`
        build, and no turn can read its answer off another's text (in a plain multi-turn conversation the
        shape answer is often in an earlier turn: "is there a blue square? yes").

        Returns (ids, labels, position ids, turn index per token (-1 = the shared prefix), per turn: the
        positions that predict its answer words).
        """
        prefix = None
        ids, labels, pos, turn, at = [], [], [], [], []
        for k, (q, a) in enumerate(turns):
            prompt = self.first_turn(q)
            cut = prompt.index(IMAGE_TOKEN_ID) + self.n_image
            if prefix is None:
                prefix = prompt[:cut]
                ids, labels, pos, turn = list(prefix), [-100] * cut, list(range(cut)), [-1] * cut
            elif prompt[:cut] != prefix:
                raise SystemExit("train_demo: prompts do not share the image prefix (a vtc bug).")
            answer = self.ids(a) + [EOS_ID]
            body = prompt[cut:] + answer
            start = len(ids)
            at.append([start + len(prompt) - cut - 1 + j for j in range(len(answer) - 1)])  # "top left": two
            ids += body
            labels += [-100] * (len(prompt) - cut) + answer
            pos += range(cut, cut + len(body))
            turn += [k] * len(body)
        return ids, labels, pos, turn, at


def block_mask(turn, valid):
    """[B, 1, T, T] boolean attention mask (True = may attend) for packed sequences: causal, a turn sees the
    shared image prefix and itself; padding sees only itself (so no softmax row is empty)."""
    import torch

    t = turn.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = (turn[:, :, None] == turn[:, None, :]) | (turn[:, None, :] == -1)
    allowed = causal & same & valid[:, None, :].bool() & valid[:, :, None].bool()
    return (allowed | torch.eye(t, dtype=torch.bool))[:, None]


def cell_labels(objs) -> tuple[list[int], list[int], list[int]]:
    """Per patch (row-major 16 x 16): the colour and shape class of the object in its grid cell (0 = empty),
    and the cell's index (0-15, so the features keep where they are).

    The auxiliary target that makes the tower's features say what is where early in training; each grid
    cell is exactly 4 x 4 patches. Only used for training; the head is not part of the checkpoint.
    """
    from vtc.runtime import synthetic_vqa as sv

    side, per = IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH // sv.GRID
    at = {(o.row, o.col): o for o in objs}
    colors, shapes = list(sv.COLORS), list(sv.SHAPES)
    cls_c, cls_s, cell = [], [], []
    for r in range(side):
        for c in range(side):
            o = at.get((r // per, c // per))
            cls_c.append(0 if o is None else 1 + colors.index(o.color))
            cls_s.append(0 if o is None else 1 + shapes.index(o.shape))
            cell.append((r // per) * sv.GRID + c // per)
    return cls_c, cls_s, cell


def ref_patches(refs) -> list[int]:
    """Row-major patch indices of the grid cells of the objects a question names (see question_refs)."""
    from vtc.runtime import synthetic_vqa as sv

    side, per = IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH // sv.GRID
    cells = {(o.row, o.col) for o in refs}
    return [r * side + c for r in range(side) for c in range(side) if (r // per, c // per) in cells]


def scene_batch(rng: random.Random, n: int, pre, enc: Encoder):
    """n images, each with one question of every type in a random order, + per-patch auxiliary targets."""
    import numpy as np
    import torch
    from vtc.runtime import synthetic_vqa as sv

    pixels, seqs, aux, where = [], [], [], []
    for _ in range(n):
        objs = sv.scene(rng)
        turns = [sv.question_refs(objs, kind, rng) for kind in sv.TYPES]
        rng.shuffle(turns)
        pixels.append(pre(sv.render(objs)))
        seqs.append(enc.packed([(q, a) for q, a, _ in turns]))
        aux.append(cell_labels(objs))
        # head 0 looks at the object a question names (all of them for a count); for a relation head 0 looks
        # at the first object and head 1 at the second, so the answer can compare where each one is
        where.append([(ref_patches(refs[:1]), ref_patches(refs[1:])) if " left of " in q or " above " in q
                      else (ref_patches(refs), [])
                      for q, _, refs in turns])
    width = max(len(s[0]) for s in seqs)
    ids = torch.full((n, width), PAD_ID, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    valid = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    turn = torch.full((n, width), -2, dtype=torch.long)  # -2: padding
    looks = max(sum(map(len, s[4])) for s in seqs)  # answer positions per sequence
    answer_at = torch.zeros((n, looks), dtype=torch.long)
    refs = torch.zeros((n, looks, 2, width), dtype=torch.bool)  # per answer position and head: keys to attend
    start = seqs[0][0].index(IMAGE_TOKEN_ID)
    for i, (s, lab, pos, grp, at) in enumerate(seqs):
        ids[i, :len(s)], labels[i, :len(s)], valid[i, :len(s)] = torch.tensor(s), torch.tensor(lab), 1
        positions[i, :len(s)], turn[i, :len(s)] = torch.tensor(pos), torch.tensor(grp)
        slot = 0
        for predict, heads in zip(at, where[i]):
            for j in predict:  # every answer word looks at the same objects
                answer_at[i, slot] = j
                for h, patches in enumerate(heads):
                    refs[i, slot, h, [start + k for k in patches]] = True
                slot += 1
    return (torch.from_numpy(np.concatenate(pixels)), ids, block_mask(turn, valid), positions, labels,
            torch.tensor(aux), answer_at, refs)  # aux [n, 3, 256]


class AuxHead:
    """Training-only linear head: colour (7), shape (5) and grid-cell (16) of the projected visual tokens."""

    def __init__(self, hidden: int):
        import torch

        self.linear = torch.nn.Linear(hidden, 28)

    def parameters(self):
        return list(self.linear.named_parameters(prefix="aux"))

    def loss(self, feats, aux):
        import torch.nn.functional as F

        logits = self.linear(feats)  # [B, 256, 28]
        return (F.cross_entropy(logits[..., :7].flatten(0, 1), aux[:, 0].flatten())
                + F.cross_entropy(logits[..., 7:12].flatten(0, 1), aux[:, 1].flatten())
                + F.cross_entropy(logits[..., 12:].flatten(0, 1), aux[:, 2].flatten())) / 3


def attention_loss(model, states, mask, positions, answer_at, refs, layer: int):
    """-log(attention mass) that heads 0 and 1 of LM layer `layer` put, at each position that predicts an
    answer word, on the patches `refs` gives them (position x head; empty ones, e.g. presence "no", head 1
    outside a relation or padding, are left out).

    Recomputed from the layer's input (`states`) with the layer's own norm, projections and rotary
    embedding, for the answer positions only: no eager attention over the whole batch is needed.
    """
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = model.model.language_model
    attn = lm.layers[layer].self_attn
    x = lm.layers[layer].input_layernorm(states)
    b, t, _ = x.shape
    hd = attn.head_dim
    group = attn.num_key_value_groups  # query heads per KV head
    q = attn.q_proj(x).view(b, t, -1, hd)[:, :, :2].transpose(1, 2)  # heads 0, 1    [b, 2, t, hd]
    k = attn.k_proj(x).view(b, t, -1, hd).transpose(1, 2)[:, [0, 1 // group]]  # their KV heads
    cos, sin = lm.rotary_emb(x, positions)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    qa = q.gather(2, answer_at[:, None, :, None].expand(-1, 2, -1, hd))  # [b, 2, turns, hd]
    scores = (qa @ k.transpose(2, 3)) * attn.scaling  # [b, 2, turns, t]
    visible = mask[:, 0].gather(1, answer_at[..., None].expand(-1, -1, t))[:, None]  # the rows the model used
    logp = scores.masked_fill(~visible, float("-inf")).log_softmax(-1)
    want = refs.transpose(1, 2)  # [b, 2, turns, t]
    mass = torch.logsumexp(logp.masked_fill(~want, float("-inf")), -1)  # log of the mass on the named objects
    return -mass[want.any(-1)].mean()


def train_step(model, head: AuxHead, batch, args):
    """The answer loss + aux_weight x the per-patch loss + attn_weight x the attention loss; the tower runs
    once per image. Returns (total, answer, per-patch, attention)."""
    import torch

    pixels, ids, mask, positions, labels, aux, answer_at, refs = batch
    feats = model.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                           vision_feature_select_strategy="default").pooler_output
    feats = torch.stack(list(feats))  # [B, 256, hidden]
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == IMAGE_TOKEN_ID)[..., None], feats.reshape(-1, feats.shape[-1]))
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels,
                output_hidden_states=bool(args.attn_weight))
    zero = torch.zeros(())
    side = head.loss(feats, aux) if args.aux_weight else zero
    look = attention_loss(model, out.hidden_states[args.attn_layer], mask, positions, answer_at, refs,
                          args.attn_layer) if args.attn_weight else zero
    return out.loss + args.aux_weight * side + args.attn_weight * look, out.loss, side, look


def evaluate(model, examples, pre, enc: Encoder, batch: int = 50) -> dict:
    """Greedy answers (until </s>, at most 4 tokens) to single questions, scored like `vtc-export eval`."""
    import numpy as np
    import torch
    from vtc.runtime.evaluate import score

    per_type: dict[str, list[float]] = {}
    model.eval()
    with torch.inference_mode():
        for b in range(0, len(examples), batch):
            chunk = examples[b:b + batch]
            prompts = [enc.first_turn(e.question) for e in chunk]
            width = max(map(len, prompts))  # left-pad so every prompt ends at the last column
            ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
            mask = (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
            pixels = torch.from_numpy(np.concatenate([pre(e.image) for e in chunk]))
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=4,
                                 do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
            for e, row in zip(chunk, out[:, width:].tolist()):
                words = row[:row.index(EOS_ID)] if EOS_ID in row else row
                pred = enc.tok.decode(words)
                per_type.setdefault(e.type, []).append(score(pred, [e.answer]))
    model.train()
    every = [s for v in per_type.values() for s in v]
    return {"n": len(every), "accuracy": statistics.mean(every),
            "per_type": {t: round(statistics.mean(v), 4) for t, v in sorted(per_type.items())}}


def write_card(out: Path, args, meta: dict) -> None:
    m = meta["final"]
    rows = "\n".join(f"| {t} | {100 * a:.1f} |" for t, a in m["per_type"].items())
    (out / "README.md").write_text(f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llava, vtc, synthetic]
---
# vtc demo model (v{VERSION}): a small LLaVA trained on synthetic shapes

A LLaVA-1.5-architecture model (`LlavaForConditionalGeneration`: CLIP vision tower {args.vision_hidden} wide x
{args.vision_layers} layers, 128 px / 8 px patches = 256 visual tokens; 2-layer GELU projector; Llama LM
{args.hidden} wide x {args.layers} layers, {args.heads} heads / {args.kv_heads} KV heads) trained from scratch on
`vtc.runtime.synthetic_vqa`: coloured shapes (circle, square, triangle, star in six colours) on a 4 x 4
grid; questions about colour, shape, presence, position (quadrant), count and relation (left of / above).
It answers those questions and nothing else: it is vtc's built-in demo and test model, not a general VLM.
Tokenizer: word-level ({meta['vocab_size']} tokens). Parameters: {meta['parameters']:,}.

## Training
- Command: `{meta['command']}`
- Seed {args.seed} (training scenes), held-out questions from seed {args.eval_seed}
- {args.steps} steps x {args.batch} images, one question of each type per image ({args.steps * args.batch:,}
  images, {6 * args.steps * args.batch:,} question/answer pairs, packed so that each question sees only the image
  and itself, in exactly the single-question prompt format of inference); AdamW lr {args.lr} (warm-up {args.warmup}, cosine),
  weight decay {args.weight_decay}, gradient clip 1.0
- Loss: cross-entropy on the answer tokens and their `</s>`, plus {args.aux_weight} x a per-patch auxiliary loss
  (a linear head on the projected visual tokens classifies the colour and shape of the object in each
  patch's grid cell, and the cell; the head is not part of this checkpoint), plus {args.attn_weight} x an
  attention loss: -log of the attention mass that head 0 of LM layer {args.attn_layer} puts, at every position that
  predicts an answer word, on the patches of the objects the question names (for a relation: head 0 on
  the first object, head 1 on the second). Both speed up learning from scratch; inference uses
  nothing but the checkpoint.
- Host: {meta['host']}, torch {meta['torch']}, transformers {meta['transformers']}, {args.threads} threads;
  wall time {meta['wall_s'] / 60:.1f} min
- Final training loss (mean of the last 50 steps): {meta['final_loss']:.4f}

## Held-out accuracy (PyTorch, greedy, {m['n']} questions, seed {args.eval_seed})
Overall **{100 * m['accuracy']:.1f}%**

| type | accuracy % |
|---|---|
{rows}

The exported ONNX artifacts are evaluated with `vtc-export eval ART --dataset synthetic --limit 500`;
see vtc's README for the accuracy of every compression method at each ratio.
""")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:2]))
    p.add_argument("--out", required=True, help="checkpoint directory to write (replaced when complete)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seed", type=int, default=1, help="held-out questions (vtc-export eval's default seed)")
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--eval", type=int, default=500, help="held-out questions scored at the end")
    p.add_argument("--eval-every", type=int, default=200, help="score --eval-every-n held-out questions every this many steps (0 = never)")
    p.add_argument("--eval-every-n", type=int, default=120)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vision-hidden", type=int, default=128)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--aux-weight", type=float, default=0.5,
                   help="weight of the per-patch colour/shape/cell loss that speeds up learning (0 = off)")
    p.add_argument("--attn-weight", type=float, default=0.5,
                   help="weight of the loss that points one LM attention head at the objects a question names (0 = off)")
    p.add_argument("--attn-layer", type=int, default=2, help="LM layer of that head (0-based)")
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    for flag in ("steps", "batch", "eval", "eval_every_n", "log_every", "threads", "layers", "hidden", "vision_layers",
                 "vision_hidden"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(args, flag)})")
    if args.eval_every < 0 or args.warmup < 0 or args.lr <= 0:
        p.error("--eval-every and --warmup must be >= 0 and --lr > 0")
    target = Path(args.out)
    if target.exists() and not (target.is_dir() and (target / "vtc_demo.json").is_file()):
        # the finished checkpoint replaces --out: never delete something that is not a previous demo checkpoint
        p.error(f"--out {target} exists and is not a vtc demo checkpoint (no vtc_demo.json); pass a new directory "
                "or remove it first")
    if not 0 <= args.attn_layer < args.layers:
        p.error(f"--attn-layer {args.attn_layer} is not a layer of a {args.layers}-layer LM (0..{args.layers - 1})")

    import torch
    import transformers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    from vtc.export.wordtok import LLAVA15_CHAT_TEMPLATE, save_word_level_tokenizer
    from vtc.runtime.preprocess import ImagePreprocessor
    from vtc.runtime.synthetic_vqa import examples

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` removes the temporary directory
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        vocab_size = save_word_level_tokenizer(tmp, vocabulary(), LLAVA15_CHAT_TEMPLATE)
        image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                             crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
        processor = LlavaProcessor(image_processor=image_processor,
                                   tokenizer=PreTrainedTokenizerFast.from_pretrained(tmp), patch_size=PATCH,
                                   vision_feature_select_strategy="default", chat_template=LLAVA15_CHAT_TEMPLATE,
                                   num_additional_image_tokens=1)
        processor.save_pretrained(tmp)
        pre = ImagePreprocessor.from_dir(tmp)
        enc = Encoder(tmp / "tokenizer.json", (IMAGE_SIZE // PATCH) ** 2)
        model = build_model(args, vocab_size)
        model.train()
        n_params = sum(t.numel() for t in model.parameters())
        print(f"train_demo: {n_params:,} parameters, {args.steps} steps x {args.batch} images, {args.threads} threads",
              flush=True)

        head = AuxHead(args.hidden)
        named = list(model.named_parameters()) + head.parameters()
        decay = [t for n, t in named if t.ndim >= 2 and "embed" not in n]
        no_decay = [t for n, t in named if not (t.ndim >= 2 and "embed" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

        def lr_at(step: int) -> float:
            if step < args.warmup:
                return args.lr * (step + 1) / args.warmup
            t = (step - args.warmup) / max(1, args.steps - args.warmup)
            return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

        held_out = examples(args.eval_seed, args.eval)
        rng = random.Random(args.seed)
        losses, side_losses, look_losses, t0 = [], [], [], time.perf_counter()
        params = [t for _, t in named]
        for step in range(args.steps):
            batch = scene_batch(rng, args.batch, pre, enc)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss, lm, side, look = train_step(model, head, batch, args)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(lm.item())
            side_losses.append(side.item())
            look_losses.append(look.item())
            if (step + 1) % args.log_every == 0 or step == 0:
                el = time.perf_counter() - t0
                print(f"step {step + 1:5d}/{args.steps}  answer loss {statistics.mean(losses[-args.log_every:]):.4f}  "
                      f"patch loss {statistics.mean(side_losses[-args.log_every:]):.4f}  "
                      f"attention loss {statistics.mean(look_losses[-args.log_every:]):.4f}  "
                      f"lr {lr_at(step):.2e}  {el / 60:5.1f} min  ({el / (step + 1):.2f} s/step, "
                      f"eta {(args.steps - step - 1) * el / (step + 1) / 60:.1f} min)", flush=True)
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                m = evaluate(model, held_out[:args.eval_every_n], pre, enc)
                print(f"  held-out ({m['n']}): {100 * m['accuracy']:.1f}%  {m['per_type']}", flush=True)
        wall = time.perf_counter() - t0
        final = evaluate(model, held_out, pre, enc)
        print(f"final held-out ({final['n']}): {100 * final['accuracy']:.1f}%  {final['per_type']}", flush=True)

        model.eval()
        model.save_pretrained(tmp, safe_serialization=True)
        meta = {"version": VERSION, "command": " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])
                if argv is None else "train_demo " + " ".join(argv),
                "seed": args.seed, "eval_seed": args.eval_seed, "args": vars(args), "parameters": n_params,
                "vocab_size": vocab_size, "wall_s": round(wall, 1),
                "final_loss": statistics.mean(losses[-50:]), "final": final,
                "host": f"{platform.machine()} {os.cpu_count()} CPUs", "torch": torch.__version__,
                "transformers": transformers.__version__}
        meta["args"]["out"] = out.name
        (tmp / "vtc_demo.json").write_text(json.dumps({"demo": True, "trained": True, **meta}, indent=2) + "\n")
        write_card(tmp, args, meta)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        print(f"train_demo: wrote {out} ({wall / 60:.1f} min)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
