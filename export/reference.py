"""The PyTorch reference every artifact is checked against: HF's own modeling code end to end.

It does not reuse the export wrappers: visual features come from HF `get_image_features` on the full
(untruncated) tower, [CLS] attention from HF `output_attentions=True`, the compression is the method's
eager PyTorch code, and tokens come from HF `generate` (greedy) on the merged `inputs_embeds`, or,
uncompressed, from `generate(input_ids, pixel_values)` exactly as a transformers user would call it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from vtc.export.methods.base import Method, Plan, compress_images


@dataclass
class Reference:
    tokens: list[int]  # greedy new tokens
    step_logits: list  # [V] float32 tensors: logits that chose each token (step 0 = prefill)
    image_embeds: torch.Tensor  # [1, K, D]: the vision graph's output (in-LLM methods: all N tokens)
    kept_index: list[int]  # the final selection: kept visual tokens (in-LLM methods: after pruning)
    token_map: list[int]


@contextlib.contextmanager
def float32_compute(model):
    """HF's forward in float32 on a float16/bfloat16 model, without a float32 copy of it.

    Every module with parameters of its own casts them, and its floating-point inputs, to float32 when it is
    called, and puts the stored tensors back when it returns (the weights are never changed; fp16/bf16 ->
    fp32 is exact), so memory holds one module's float32 weights at a time (the largest, the 7B LM head:
    0.5 GB). The result is HF's float32 math on the build-dtype weights: the reference reduced-precision
    graphs are held to (parity.DTYPE_TOLERANCE), computed at float32 speed. No-op on a float32 model."""
    if next(model.parameters()).dtype == torch.float32:
        yield
        return
    saved: dict[int, list] = {}

    def up(x):
        return x.float() if torch.is_tensor(x) and x.is_floating_point() else x

    def pre(module, args, kwargs):
        stored = []
        for p in module.parameters(recurse=False):
            stored.append((p, p.data))
            p.data = p.data.float()
        saved.setdefault(id(module), []).append(stored)
        return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}

    def post(module, args, kwargs, output):
        for p, data in saved[id(module)].pop():
            p.data = data

    # HF models cast inputs to `self.dtype` (the first parameter's: fp16 here), e.g. SmolVLM's image features
    # before masked_scatter into float32 text embeddings; while computing in float32 they report float32.
    classes = {type(m) for m in model.modules() if isinstance(getattr(type(m), "dtype", None), property)}
    own = {c: c.__dict__["dtype"] for c in classes if "dtype" in c.__dict__}
    handles = []
    try:
        for c in classes:
            c.dtype = property(lambda self: torch.float32)
        for m in model.modules():
            if next(m.parameters(recurse=False), None) is not None:
                handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
                handles.append(m.register_forward_hook(post, with_kwargs=True, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for c in classes:
            if c in own:
                c.dtype = own[c]
            else:
                del c.dtype


def reference_visual(adapter, model, method, plan: Plan, spec, pixel_values: torch.Tensor):
    """(embeds [1, K, D], kept_index [1, K], token_map [1, N]) in eager PyTorch.

    Methods that only `compress` run on HF's own features (`adapter.reference_features`); methods that
    run the encoder themselves (vision_forward overridden, e.g. ToMe) run their eager path."""
    with torch.no_grad():
        if type(method).vision_forward is not Method.vision_forward:
            return method.vision_forward(adapter, model, pixel_values, spec, plan)
        return compress_images(method, adapter.reference_features(model, pixel_values), spec, plan)


def _greedy(model, max_new_tokens: int, **inputs) -> tuple[list[int], list]:
    """HF greedy generate for exactly max_new_tokens (EOS disabled: HF merges the model's own
    generation_config over the one passed in, so its eos_token_id is cleared for the call)."""
    from transformers import GenerationConfig

    gc = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                          output_logits=True, return_dict_in_generate=True)
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        with torch.no_grad():
            out = model.generate(**inputs, generation_config=gc)
    finally:
        model.generation_config.eos_token_id = saved
    assert len(out.logits) == max_new_tokens, "HF generate stopped early"
    new = out.sequences[0, -max_new_tokens:].tolist()
    return new, [lg[0].float() for lg in out.logits]


def reference_generate(adapter, model, method, plan: Plan, spec, pixel_values: torch.Tensor,
                       before: list[int], after: list[int], max_new_tokens: int,
                       forced_image_kept: list[int] | None = None) -> Reference:
    """Greedy generation of the compressed model in PyTorch (no EOS stop: exactly max_new_tokens).
    `forced_image_kept`: an in-LLM method's kept image tokens given instead of selected (see eager_generate)."""
    if method.stage == "llm":
        ref, _ = eager_generate(adapter, model, method, plan, pixel_values, before, after, max_new_tokens,
                                forced_image_kept)
        return ref
    image_embeds, kept, token_map = reference_visual(adapter, model, method, plan, spec, pixel_values)
    if not method.compresses:  # exactly as a transformers user calls generate
        tokens, logits = _greedy(model, max_new_tokens,
                                 **adapter.reference_generate_inputs(model, before, after, pixel_values))
    else:
        table = adapter.embed_table(model)
        embeds = adapter.merge_embeds(model, table, before, image_embeds, after)  # tiles: per-tile text between
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        if adapter.rope == "1d":
            tokens, logits = _greedy(model, max_new_tokens, inputs_embeds=embeds, attention_mask=mask)
        else:  # multimodal positions: the kept tokens' original ones (adapter.prompt_positions)
            positions = adapter.prompt_positions(model, before, kept[0].tolist(), after)
            tokens, logits = _greedy_at_positions(model, table, embeds, positions, max_new_tokens)
    return Reference(tokens=tokens, step_logits=logits, image_embeds=image_embeds, kept_index=kept[0].tolist(),
                     token_map=token_map[0].tolist())


def _greedy_at_positions(model, table, embeds, positions, max_new_tokens: int) -> tuple[list[int], list]:
    """HF's own forward, greedy, fed inputs_embeds [1, S, D] at explicit positions ([3, 1, S] for M-RoPE) over
    its DynamicCache; decode continues at the largest position + 1 (HF's rope_deltas rule), one per step."""
    import inspect

    from transformers import DynamicCache

    # transformers renamed past_key_values to cache (5.2x; the old name warns, then goes in 5.40)
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache, tokens, step_logits = {key: DynamicCache(config=model.config)}, [], []
    nxt = int(positions.max()) + 1
    with torch.no_grad():
        out = model(inputs_embeds=embeds, position_ids=positions, use_cache=True, **cache)
        for step in range(max_new_tokens):
            step_logits.append(out.logits[0, -1].float())
            tokens.append(int(torch.argmax(step_logits[-1])))
            if step + 1 == max_new_tokens:
                break
            pos = torch.full((positions.shape[0], 1, 1), nxt + step) if positions.dim() == 3 else torch.tensor([[nxt + step]])
            out = model(inputs_embeds=table[tokens[-1]][None, None], position_ids=pos, use_cache=True, **cache)
    return tokens, step_logits


def _flat(kv: list) -> tuple:
    return tuple(t for pair in kv for t in pair)


def _forced(image_kept: list[int], hidden, image_start: int, n: int):
    """_select's result for a given pure selection: every text token plus `image_kept`."""
    from vtc.runtime.selectors import from_keep

    seq = hidden.shape[1]
    keep = [*range(image_start), *(image_start + i for i in image_kept), *range(image_start + n, seq)]
    sel = from_keep(np.asarray(keep), hidden[0, keep].numpy(), image_start, n)
    return (torch.from_numpy(sel.hidden)[None], torch.from_numpy(sel.keep), sel.image_kept.tolist(),
            sel.merged_into.tolist())


def _select(method, plan: Plan, hidden, last_attn, image_start: int):
    """(hidden [1, S', D], keep [S'], image_kept [K], token_map [N]) with the deployed selection code."""
    sel = method.run_selector(hidden[0].numpy(), last_attn[0].numpy(), image_start, plan)
    return (torch.from_numpy(sel.hidden)[None], torch.from_numpy(sel.keep), sel.image_kept.tolist(),
            sel.merged_into.tolist())


def eager_generate(adapter, model, method, plan: Plan, pixel_values, before, after, max_new_tokens: int,
                   forced_image_kept: list[int] | None = None):
    """Greedy generation in eager PyTorch over the LLM segments (HF modules, vtc.export.llm), with the
    deployed selection for in-LLM methods: (Reference, kv) where kv[i] = [K, V] of layer i, each
    [1, Hkv, len_i, Dh], everything the cache held at the end (calibration reads it).
    `forced_image_kept`: keep these image tokens (0-based in the image span) and every text token instead of
    running the selector (a pure selection such as FastV's; parity re-runs the reference on the artifact's
    own selection when a quantized KV cache legitimately flips a near-tie in the ranking)."""
    from vtc.export import methods

    spec = adapter.visual_spec(model)
    with torch.no_grad():
        if method.stage == "llm":  # the vision side is uncompressed; the selection happens between segments
            none = methods.get(methods.NONE)
            image_embeds, kept, token_map = reference_visual(adapter, model, none, none.plan(spec, 1.0, {}), spec,
                                                             pixel_values)
        else:
            image_embeds, kept, token_map = reference_visual(adapter, model, method, plan, spec, pixel_values)
    table = adapter.embed_table(model)
    embeds = adapter.merge_embeds(model, table, before, image_embeds, after)  # [1, S, D]
    n_layers = adapter.lm_spec(model).num_layers
    w = method.work_layer(plan) or n_layers
    segs = [adapter.static_cache_lm(model, (0, w))] + ([adapter.static_cache_lm(model, (w, n_layers))] if w < n_layers else [])
    kv_shape = (1, adapter.lm_spec(model).num_kv_heads, 0, segs[0].head_dim)
    kv = [[torch.zeros(kv_shape), torch.zeros(kv_shape)] for _ in range(n_layers)]
    with torch.no_grad():
        hidden, logits = embeds, None
        positions = adapter.prompt_positions(model, before, torch.as_tensor(kept)[0].tolist(), after)  # [1|3, .., S]
        for seg in segs:
            outs = seg(hidden, positions, torch.zeros(seg.num_layers, dtype=torch.int64),
                       torch.tensor([hidden.shape[1] - 1]) if seg.has_head else None,
                       _flat(kv[seg.first:seg.end]))
            presents = outs[1:] if seg.has_head else outs[2:]
            kv[seg.first:seg.end] = [[presents[2 * i], presents[2 * i + 1]] for i in range(seg.num_layers)]
            if seg.has_head:
                logits = outs[0]
                break
            if forced_image_kept is None:
                hidden, keep, kept, token_map = _select(method, plan, outs[0], outs[1], len(before))
            else:
                hidden, keep, kept, token_map = _forced(forced_image_kept, outs[0], len(before), plan.n)
            if method.trims_pre_kv:
                kv[:w] = [[k[:, :, keep], v[:, :, keep]] for k, v in kv[:w]]
            positions = positions[..., keep]  # the kept tokens' original positions
            kept, token_map = torch.tensor([kept]), torch.tensor([token_map])
        tokens, step_logits = _eager_decode(segs, kv, table, logits[0], int(positions.max()) + 1, max_new_tokens)
    ref = Reference(tokens=tokens, step_logits=step_logits, image_embeds=image_embeds,
                    kept_index=torch.as_tensor(kept)[0].tolist(), token_map=torch.as_tensor(token_map)[0].tolist())
    return ref, kv


def _eager_decode(segs, kv: list, table, logits, position: int, max_new_tokens: int):
    tokens, step_logits = [], [logits.float()]
    for _ in range(max_new_tokens):
        tokens.append(int(torch.argmax(step_logits[-1])))
        if len(tokens) == max_new_tokens:
            break
        hidden = table[tokens[-1]][None, None]
        pos = torch.tensor([[position]])
        for seg in segs:
            layers = range(seg.first, seg.end)
            lengths = torch.tensor([kv[i][0].shape[2] for i in layers])
            outs = seg(hidden, pos, lengths, torch.tensor([0]) if seg.has_head else None, _flat([kv[i] for i in layers]))
            presents = outs[1:] if seg.has_head else outs[2:]
            for j, i in enumerate(layers):
                kv[i] = [torch.cat([kv[i][0], presents[2 * j]], 2), torch.cat([kv[i][1], presents[2 * j + 1]], 2)]
            hidden = outs[0]
        step_logits.append(hidden[0].float())
        position += 1
    return tokens, step_logits
