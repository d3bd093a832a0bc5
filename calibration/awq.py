"""AWQ: activation-aware scaling for int4 weights (Lin et al., "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration", MLSys 2024), following mit-han-lab/llm-awq's search
(awq/quantize/auto_scale.py `auto_scale_block`, pre_quant.py `run_awq`, commit d6e797a4).

Run on the torch model before export (`build --weights int4 --weights-algo awq`), one decoder layer at a
time: the calibration pairs' hidden states enter layer l (already through the scaled layers < l), and
for each group (previous op -> linear layers it feeds)

    x_mean[c] = mean over tokens of |x[t, c]|               (x: the linears' input, [T, C_in])
    for alpha in {0, 1/20, ..., 19/20}:
        s = clamp(x_mean ** alpha, min=1e-4);  s = s / sqrt(max(s) * min(s))
        W' = Q(W * s) / s            (Q: vtc.export.wquant's int4 quantizer: symmetric, blocks of g on C_in)
        err(alpha) = mean (module(x) - module'(x))^2        (module: the block the group sits in)
    s* = the s of the smallest err; the previous op absorbs 1/s*, the linears s*: W <- W * s*.
    alpha = 0 is s = 1, plain round-to-nearest, so the chosen scales never do worse than RTN on the
    calibration data (the summary records both errors per group).

Groups of a Llama-family layer (as llm-awq):
    input_layernorm          -> q_proj, k_proj, v_proj    module: self_attn (the whole attention)
    v_proj (output rows)     -> o_proj                    only when v_proj and o_proj weights have one shape (no GQA)
    post_attention_layernorm -> gate_proj, up_proj        module: mlp
    up_proj (output rows)    -> down_proj                 module: down_proj
The folding is exact in real arithmetic (RMSNorm's weight and up/v rows multiply what the next linear
reads), so the float model is unchanged up to rounding; the int4 graph then quantizes W * s*.

Clipping (llm-awq awq/quantize/auto_clip.py `auto_clip_layer`), after the layer's scales are folded, for
every linear but q_proj/k_proj ("due to qk bmm, it is hard to clip precisely"), on up to CLIP_TOKENS
tokens of its (scaled) input x:
    per output channel c and block b: m = max |W[c, b]|;  for i in 0..9: m_i = m * (1 - i/20)
        err_i = mean over tokens of (x_b . Q(clamp(W[c, b], -m_i, m_i)) - x_b . W[c, b])^2
    clip[c, b] = the m_i of the smallest err (i = 0: no clipping)
The float weights are NOT clamped (unlike llm-awq's apply_clip): the thresholds travel with the model
(`CLIP_MARK`, keyed by the sha256 of each weight as the graph stores it, W^T in the graph dtype) to the
ONNX pass, which clamps before it quantizes; so the float model, the parity reference and the accuracy
report's reference stay the unclipped model. Memory: one layer in float32 at a time, plus the
calibration hidden states of that layer.
The calibration inputs are the KV calibration set (vtc.calibration.dataset); for in-LLM methods (FastV)
every layer sees the full prompt (no pruning at the work layer).
"""

from __future__ import annotations

import torch

from vtc.export.wquant import AWQ_MARK, CLIP_MARK, QRANGE

N_GRID = 20  # llm-awq's grid: alpha = 0, 0.05, ..., 0.95
N_SHRINK = 10  # llm-awq auto_clip: max_shrink 0.5 on a grid of 20 -> m * (1 - i/20), i < 10
CLIP_TOKENS = 512  # llm-awq n_sample_token
CLIP_SKIP = ("q_proj", "k_proj")
# Calibration tokens are capped so that the widest linear input over all of them (down_proj's, [T, I]
# float32) stays under this: the memory of one layer's search is a few times it (7B: I = 11008 -> ~6000
# tokens, ~10 pairs of 600; the demo model: every pair). Whole pairs are kept, at least one.
FEATURE_BYTES = 256 << 20


@torch.no_grad()
def pseudo_quantize(w: torch.Tensor, group: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Q(W) for an nn.Linear weight [out, in]: int4, symmetric, blocks of `group` along `in` (as the ONNX
    pass: s = absmax / 7, s = 1 for an all-zero block, q = clamp(round(w / s), -8, 7)); returns q * s.
    `clip` [out, in/group]: each block is clamped to +-clip first (the AWQ clipping search)."""
    lo, hi = QRANGE["int4"]
    out_f, in_f = w.shape
    blocks = w.float().reshape(out_f, in_f // group, group)
    if clip is not None:
        c = clip.float()[..., None]
        blocks = torch.maximum(torch.minimum(blocks, c), -c)
    s = blocks.abs().amax(dim=-1, keepdim=True) / hi
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.clamp(torch.round(blocks / s), lo, hi) * s).reshape(out_f, in_f).to(w.dtype)


@torch.no_grad()
def pseudo_quantize_int8(w: torch.Tensor) -> torch.Tensor:
    """Q(W) for int8 per output channel (the ONNX pass's int8 form): s = absmax of the row / 127."""
    lo, hi = QRANGE["int8"]
    s = w.float().abs().amax(dim=1, keepdim=True) / hi
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.clamp(torch.round(w.float() / s), lo, hi) * s).to(w.dtype)


def _groups(layer) -> list[tuple]:
    """(prev op, [linears], module to inspect, calls the module with the attention kwargs) per group."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], attn, True)]
    if attn.v_proj.weight.shape == attn.o_proj.weight.shape:
        groups.append((attn.v_proj, [attn.o_proj], attn.o_proj, False))
    groups += [(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], mlp, False),
               (mlp.up_proj, [mlp.down_proj], mlp.down_proj, False)]
    return groups


@torch.no_grad()
def _run(module, xs: list, kwargs: list | None) -> list:
    outs = []
    for i, x in enumerate(xs):
        y = module(x, **kwargs[i]) if kwargs is not None else module(x)
        outs.append(y[0] if isinstance(y, tuple) else y)
    return outs


def _error(a: list, b: list) -> float:
    return float(sum((x - y).float().pow(2).sum() for x, y in zip(a, b)) / sum(x.numel() for x in a))


@torch.no_grad()
def search_scale(linears: list, module, xs: list, kwargs: list | None, group: int) -> tuple:
    """The grid search of one group: (best scales [C_in], best alpha, RTN error, best error).
    xs: the linears' input per calibration pair, each [1, T, C_in]."""
    x_mean = torch.cat([x.reshape(-1, x.shape[-1]).abs() for x in xs]).float().mean(0)
    reference = _run(module, xs, kwargs)
    saved = [lin.weight.data.clone() for lin in linears]
    best = (None, None, None, float("inf"))  # scales, alpha, rtn error, error
    rtn = None
    for i in range(N_GRID):
        alpha = i / N_GRID
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        for lin, w in zip(linears, saved):
            lin.weight.data = pseudo_quantize(w * s.view(1, -1), group) / s.view(1, -1)
        err = _error(reference, _run(module, xs, kwargs))
        rtn = err if i == 0 else rtn
        if err < best[3]:
            best = (s.clone(), alpha, rtn, err)
        for lin, w in zip(linears, saved):
            lin.weight.data = w.clone()
    return best[0], best[1], rtn, best[3]


@torch.no_grad()
def fold(prev, linears: list, s: torch.Tensor) -> None:
    """prev /= s (an RMSNorm's weight, or the last len(s) output rows of a linear), linears *= s."""
    if isinstance(prev, torch.nn.Linear):
        prev.weight[-s.numel():].div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias[-s.numel():].div_(s.to(prev.bias.dtype))
    else:
        prev.weight.div_(s.to(prev.weight.dtype))
    for lin in linears:
        lin.weight.mul_(s.view(1, -1).to(lin.weight.dtype))


def _inputs_of(modules: list, layer, hs: list, kwargs: list) -> tuple[list, list]:
    """Run the layer on every pair: ({id(module): [its input per pair]}, [the layer's output per pair])."""
    seen: dict[int, list] = {id(m): [] for m in modules}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen[id(mod)].append(args[0].detach()))
             for m in modules]
    try:
        outs = _run(layer, hs, kwargs)
    finally:
        for h in hooks:
            h.remove()
    return seen, outs


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, group: int) -> tuple[torch.Tensor, float, float]:
    """llm-awq's auto_clip_layer for one weight [out, in] and its input x [T, in]: (clip [out, in/group],
    output error without clipping, with the chosen clipping), errors as mean squares over the blocks."""
    x = x.reshape(-1, x.shape[-1]).float()
    x = x[:: max(1, x.shape[0] // CLIP_TOKENS)][:CLIP_TOKENS]
    out_f, in_f = w.shape
    ng = in_f // group
    xg = x.reshape(-1, ng, group)  # [T, ng, g]
    rows = max(1, (1 << 24) // max(1, x.shape[0] * ng))  # output channels per batch: [rows, T, ng] at a time
    best_all, base, chosen = [], 0.0, 0.0
    for r0 in range(0, out_f, rows):
        wb = w[r0:r0 + rows].float().reshape(-1, ng, group)  # [c, ng, g]
        org = torch.einsum("tbj,cbj->ctb", xg, wb)
        org_max = wb.abs().amax(dim=-1)  # [c, ng]
        best, min_err = org_max.clone(), None
        for i in range(N_SHRINK):
            m = org_max * (1 - i / 20)
            q = pseudo_quantize(wb.reshape(-1, in_f), group, m).reshape(-1, ng, group)
            err = (torch.einsum("tbj,cbj->ctb", xg, q) - org).pow(2).mean(dim=1)  # [c, ng]
            if min_err is None:
                min_err, base = err.clone(), base + float(err.sum())
            better = err < min_err
            min_err, best = torch.where(better, err, min_err), torch.where(better, m, best)
        chosen += float(min_err.sum())
        best_all.append(best)
    n = out_f * ng
    return torch.cat(best_all), base / n, chosen / n


@torch.no_grad()
def scale_layer(layer, hs: list, kwargs: list, group: int, clip: bool = False) -> tuple[list, list, dict]:
    """AWQ on one decoder layer (in place, float32); returns (the layer's outputs on `hs` before scaling,
    which are the next layer's inputs, [per group: {alpha, rtn_error, awq_error}], {nn.Linear: clip
    [out, in/group]} when `clip`)."""
    groups = _groups(layer)
    firsts = [lins[0] for _, lins, _, _ in groups]
    feats, outs = _inputs_of(firsts, layer, hs, kwargs)
    report = []
    for prev, lins, module, attn_kwargs in groups:
        xs = feats[id(lins[0])]
        s, alpha, rtn, err = search_scale(lins, module, xs, kwargs if attn_kwargs else None, group)
        fold(prev, lins, s)
        feats[id(lins[0])] = [x / s.view(1, 1, -1) for x in xs]  # what the scaled linears now read
        report.append({"alpha": alpha, "rtn_error": rtn, "awq_error": err})
    clips = {}
    if clip:
        names = {id(m): n for n, m in layer.named_modules()}
        for _, lins, _, _ in groups:
            x = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats[id(lins[0])]])
            for lin in lins:
                if not names[id(lin)].endswith(CLIP_SKIP):
                    clips[lin] = search_clip(lin.weight, x, group)
    return outs, report, clips


def weight_key(w: torch.Tensor) -> str:
    """sha256 of the weight as the exported graph stores it: W^T [in, out] in the model's dtype."""
    import hashlib

    raw = w.detach().t().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(raw.tobytes()).hexdigest()


def _float32_kwargs(kw: dict) -> dict:
    def up(v):
        if torch.is_tensor(v) and v.is_floating_point():
            return v.float()
        if isinstance(v, tuple):
            return tuple(up(x) for x in v)
        return v
    return {k: up(v) for k, v in kw.items()}


class _Stop(Exception):
    pass


@torch.no_grad()
def layer0_inputs(decoder, embeds: list) -> tuple[list, list]:
    """Each pair's hidden states entering layer 0 and the keyword arguments HF's model passes its layers
    (attention mask, position embeddings, ...), caught by a hook that stops the forward there."""
    hs, kws = [], []

    def catch(module, args, kwargs):
        hs.append((args[0] if args else kwargs.pop("hidden_states")).detach().float())
        kws.append(_float32_kwargs({k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = decoder.layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for e in embeds:
            try:
                decoder(inputs_embeds=e, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hs, kws


@torch.no_grad()
def apply(decoder, embeds: list, group: int, clip: bool = True, progress=None) -> tuple[dict, dict]:
    """AWQ over every layer of an HF Llama-family decoder (`.layers`), folded in place; `embeds`: one
    [1, S, D] inputs_embeds per calibration pair. Returns (the summary recorded in the manifest, the clip
    thresholds {weight_key: float32 [in/group, out], the ONNX pass's scale layout})."""
    hs, kws = layer0_inputs(decoder, embeds)
    layers, clips, clip_errors = [], {}, [0.0, 0.0]
    for i, layer in enumerate(decoder.layers):
        if progress:
            progress(i, len(decoder.layers))
        dtype = next(layer.parameters()).dtype
        layer.float()
        try:
            hs, report, found = scale_layer(layer, hs, kws, group, clip)
        finally:
            layer.to(dtype)
        for lin, (c, before, after) in found.items():
            clips[weight_key(lin.weight)] = c.t().contiguous().numpy().astype("float32")
            clip_errors[0] += before
            clip_errors[1] += after
        layers.append(report)
    summary = {"grid": N_GRID, "group_size": group, "pairs": len(embeds),
               "tokens": int(sum(h.shape[1] for h in hs)), "layers": layers,
               "rtn_error_sum": sum(g["rtn_error"] for r in layers for g in r),
               "awq_error_sum": sum(g["awq_error"] for r in layers for g in r),
               "clip": {"linears": len(clips), "shrink_grid": N_SHRINK, "tokens": CLIP_TOKENS,
                        "error_before_sum": clip_errors[0], "error_after_sum": clip_errors[1]} if clip else None}
    return summary, clips


# -- the build's step ------------------------------------------------------------------------------
def calibration_pairs(bp, scratch: str) -> tuple[list, str]:
    """The KV calibration set (vtc.calibration.dataset): --calib-*, the demo's synthetic task, or the photos."""
    from vtc.calibration import dataset

    args = bp.args
    if args.calib_images:
        return dataset.user_pairs(args.calib_images, args.calib_prompts), f"user: {args.calib_images}"
    if bp.demo:
        return dataset.synthetic_pairs(scratch), f"synthetic task scenes (seed {dataset.SYNTHETIC_CALIB_SEED})"
    return dataset.default_pairs("calib"), "scikit-image sample photographs"


def pair_embeds(bp, pairs: list) -> list:
    """inputs_embeds [1, S, D] per pair: text embeddings around the visual tokens the LLM will see
    (the method's compression for vision-stage methods, all N tokens for in-LLM ones)."""
    from vtc.export import methods
    from vtc.export.reference import reference_visual
    from vtc.runtime.preprocess import ImagePreprocessor, load_image
    from vtc.runtime.text import TextProcessor

    adapter, model = bp.adapter, bp.model
    method, plan = bp.method, bp.plan
    if method.stage == "llm":
        method = methods.get(methods.NONE)
        plan = method.plan(bp.spec, 1.0, {})
    pre, text = ImagePreprocessor.from_dir(bp.src), TextProcessor.from_dir(bp.src, tokenizer_as_is=adapter.tokenizer_as_is)
    table, dtype, out = adapter.embed_table(model), next(model.parameters()).dtype, []
    for image, prompt in pairs:
        pixels = torch.from_numpy(pre(load_image(image))).to(dtype)
        ids = text.prompt_ids(prompt) if text.chat_template else text.encode(f"{text.image_token}\n{prompt}")
        before, after = text.split_at_image(ids, adapter.image_token_id(model))
        visual = reference_visual(adapter, model, method, plan, bp.spec, pixels)[0]
        out.append(torch.cat([table[before][None], visual.to(table.dtype), table[after][None]], dim=1))
    return out


def within_budget(embeds: list, decoder) -> list:
    """The first pairs whose tokens fit FEATURE_BYTES at the decoder's widest linear input (at least one)."""
    widest = max(m.in_features for m in decoder.layers[0].modules() if isinstance(m, torch.nn.Linear))
    budget, kept, tokens = FEATURE_BYTES // (4 * widest), [], 0
    for e in embeds:
        if kept and tokens + e.shape[1] > budget:
            break
        kept.append(e)
        tokens += e.shape[1]
    return kept


def apply_to_build(bp, step) -> dict:
    """`build --weights int4 --weights-algo awq`: search and fold the scales into bp.model (before export)."""
    import tempfile

    group = bp.args.group_size
    decoder = bp.adapter.static_cache_lm(bp.model).decoder
    with tempfile.TemporaryDirectory(prefix="vtc-awq-") as scratch:
        pairs, name = calibration_pairs(bp, scratch)
        with step(f"AWQ: embedding {len(pairs)} calibration pairs ({name})"):
            embeds = within_budget(pair_embeds(bp, pairs), decoder)
    with step(f"AWQ: searching int4 scales and clipping (group {group}) layer by layer over {len(decoder.layers)} layers"):
        summary, clips = apply(decoder, embeds, group)
    summary["set"] = name
    setattr(bp.model, AWQ_MARK, summary)
    setattr(bp.model, CLIP_MARK, clips)
    return summary
