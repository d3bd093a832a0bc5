"""The artifact as a trust boundary: what a manifest may say, and what an artifact directory may hold.

An artifact is built on one machine and copied to others; any byte of it may have been edited. Nothing
the manifest says is used before it is checked here, and every failure is one ArtifactError that names
the field or file and says what to do.

`validate(m)` (every parse; pure, reads no file): every field the runtime reads, against its type, hard
bounds (LIMITS) and the other fields: positive sizes, KV heads dividing the heads, token ids inside the
vocabulary, the visual token counts, grid and per-layer KV lengths, KV dtypes and the exact KV byte
sizes, the graph I/O contract (names, order, dtypes and shapes the runtime feeds and reads), the
preprocessing (normalised form, image sides), the selector and position scheme, the engines entry and
the syntax of every path (relative POSIX, normalised, no `..`, no leading `/`, no hidden or odd names).

`check_files(dir, m, level)` (every `load` unless check_files=False):
  "sizes"   (the default: run, profile, eval, compare, lint, engine) every file the manifest names
            (graphs, embeddings, chat template, KV scales, engines, each graph's external data) and
            every file the runtime reads by name (tokenizer.json, ...) is listed in `files`; every listed
            file is a regular file inside the directory, reached without a symlink, of exactly the listed
            size; files up to SMALL_FILE_BYTES (tokenizer, template, configs) are hashed as well; each
            graph's inputs and outputs as its ONNX file declares them equal the manifest's; the embedding
            table's .npy header matches; the EOS ids match generation_config.json
  "hashes"  (verify, inspect --verify-hashes) the above and the sha256 of every listed file.
The manifest itself is covered by nothing inside the artifact: `digest` (sha256 of manifest.json's
bytes, printed by `inspect`) is what a deployment pins.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import stat
from pathlib import Path

import numpy as np

from vtc.runtime.errors import ArtifactError, UsageError, VtcError

REBUILD = "Rebuild the artifact with `vtc-export build` (it was edited or damaged after the build)."

# Hard limits: generous for any real model, small enough that no product of them overflows or asks for
# absurd memory before a check can refuse it.
LIMITS = {
    "layers": 1024,
    "heads": 4096,
    "head_dim": 4096,
    "hidden_size": 1 << 17,
    "vocab_size": 1 << 22,
    "seq_len": 1 << 20,  # max_seq_len, text budget, visual tokens
    "kv_bytes": 1 << 38,  # 256 GiB: the static KV cache at max_seq_len
    "embed_bytes": 1 << 36,  # 64 GiB: the embedding table
    "image_side": 8192,  # preprocessing resize / crop sides, the vision graph's H and W
    "files": 4096,
    "file_bytes": 1 << 44,
    "path_chars": 1024,
    "path_parts": 16,
    "name_chars": 512,  # tensor names, tokens, identifiers
    "text_chars": 4096,  # informational strings the runtime reads (model.source, ...)
    "tensors": 8192,  # inputs or outputs of one graph
    "dims": 8,
    "dim": 1 << 31,
    "eos_ids": 64,
    "json_depth": 32,
    "manifest_bytes": 16 << 20,
}
SMALL_FILE_BYTES = 16 << 20  # "sizes" hashes listed files up to this size too (tokenizer, template, configs)
LEVELS = ("sizes", "hashes")

KV_DTYPES = ("float32", "float16", "bfloat16", "int8", "float8_e4m3fn")
QUANTIZED_KV = ("int8", "float8_e4m3fn")  # need scales; a layer may fall back to float16
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
TENSOR_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
                           "uint16", "uint32", "uint64", "bool", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2",
                           "float8_e5m2fnuz"})
ENGINE_PRECISIONS = ("fp16", "bf16", "fp32")
# Files the runtime reads by name from the artifact directory (vtc.runtime.text.TextProcessor.from_dir:
# tokenizer, its config, special tokens, processor config, chat template, EOS ids). Where present they
# must be listed, so that nothing unlisted changes what the runtime does.
RUNTIME_READS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")
CHAT_TEMPLATE = "chat_template.jinja"  # the one template file the runtime reads (vtc.runtime.text.find_chat_template)
# The options an in-LLM selector reads at run time (vtc.runtime.selectors): name -> (lo, hi).
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
_SYMBOL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*( [-+] [0-9]+)?")
_HEX64 = re.compile(r"[0-9a-f]{64}")
MANIFEST_NAME = "manifest.json"  # vtc.runtime.manifest.MANIFEST (not imported: that module imports this one)


def _fail(what: str, fix: str = REBUILD):
    raise ArtifactError(what, fix)


# -- scalar checks ---------------------------------------------------------------------------------
def _int(value, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"manifest field {where} should be an integer, got {type(value).__name__}.")
    if not lo <= value <= hi:
        _fail(f"manifest field {where} is {_short(value)}; it must be in [{lo}, {hi}].")
    return value


def _num(value, where: str, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(f"manifest field {where} should be a number, got {type(value).__name__}.")
    try:
        x = float(value)
    except OverflowError:
        x = math.inf
    if not math.isfinite(x) or not lo <= x <= hi or (lo_open and x == lo):
        _fail(f"manifest field {where} is {_short(value)}; it must be a finite number in "
              f"{'(' if lo_open else '['}{lo:g}, {hi:g}].")
    return x


def _str(value, where: str, max_chars: int = LIMITS["name_chars"], empty: bool = False) -> str:
    if not isinstance(value, str):
        _fail(f"manifest field {where} should be a string, got {type(value).__name__}.")
    if (not value and not empty) or len(value) > max_chars:
        _fail(f"manifest field {where} is {'empty' if not value else f'{len(value)} characters'}; it must be "
              f"1 to {max_chars} characters.")
    return value


def _list(value, where: str, n: int | None = None, max_len: int = 1 << 20) -> list:
    if not isinstance(value, list):
        _fail(f"manifest field {where} should be a list, got {type(value).__name__}.")
    if n is not None and len(value) != n:
        _fail(f"manifest field {where} has {len(value)} entries; it must have {n}.")
    if len(value) > max_len:
        _fail(f"manifest field {where} has {len(value)} entries; at most {max_len} are allowed.")
    return value


def _dict(value, where: str, keys: set | None = None) -> dict:
    if not isinstance(value, dict):
        _fail(f"manifest field {where} should be an object, got {type(value).__name__}.")
    if keys is not None and set(value) != keys:
        _fail(f"manifest field {where} has keys {sorted(value)}; it must have exactly {sorted(keys)}.")
    return value


def _choice(value, where: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        _fail(f"manifest field {where} is {_short(value)}; it must be one of {', '.join(map(str, choices))}.")
    return value


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- paths -----------------------------------------------------------------------------------------
def check_path(value, where: str) -> str:
    """A path the manifest names: relative POSIX, normalised, inside the artifact, plain names only."""
    _str(value, where, LIMITS["path_chars"])
    parts = value.split("/")
    bad = (value.startswith("/") or len(parts) > LIMITS["path_parts"]
           or any(not _PART.fullmatch(p) for p in parts))
    if bad:
        _fail(f"manifest field {where} is {_short(value)}: artifact paths are relative POSIX paths inside the "
              "artifact directory (names of letters, digits and . _ + -, no leading dot, no '..', no leading "
              "'/', no '//' or trailing '/').", "vtc will not read files outside the artifact: rebuild it.")
    if value == MANIFEST_NAME:
        _fail(f"manifest field {where} names the manifest itself.", REBUILD)
    return value



# -- the manifest ----------------------------------------------------------------------------------
def validate(m) -> None:
    """Every field of Manifest `m` the runtime reads: types, bounds and consistency (no files read)."""
    from vtc.runtime import positions, selectors

    lm, c, t, kv = m.lm, m.compression, m.text, m.kv_cache
    # model
    _str(m.model.architecture, "model.architecture")
    _str(m.model.source, "model.source", LIMITS["text_chars"], empty=True)
    _str(m.model.image_token, "model.image_token")
    # lm
    L = _int(lm.num_layers, "lm.num_layers", 1, LIMITS["layers"])
    heads = _int(lm.num_heads, "lm.num_heads", 1, LIMITS["heads"])
    kvh = _int(lm.num_kv_heads, "lm.num_kv_heads", 1, heads)
    if heads % kvh:
        _fail(f"manifest field lm.num_kv_heads is {kvh}, which does not divide lm.num_heads {heads}.")
    dh = _int(lm.head_dim, "lm.head_dim", 1, LIMITS["head_dim"])
    d = _int(lm.hidden_size, "lm.hidden_size", 1, LIMITS["hidden_size"])
    vocab = _int(lm.vocab_size, "lm.vocab_size", 1, LIMITS["vocab_size"])
    _str(lm.rope, "lm.rope")
    positions.get(lm.rope)
    _int(m.model.image_token_id, "model.image_token_id", 0, vocab - 1)
    # compression
    _str(c.method, "compression.method")
    _num(c.ratio, "compression.ratio", 0.0, 1.0, lo_open=True)
    _dict(c.options, "compression.options")
    n = _int(c.n_visual, "compression.n_visual", 1, LIMITS["seq_len"])
    k = _int(c.k_visual, "compression.k_visual", 1, n)
    grid = _list(c.grid, "compression.grid", 2)
    rows, cols = (_int(g, f"compression.grid[{i}]", 1, n) for i, g in enumerate(grid))
    if not isinstance(c.has_cls, bool):
        _fail("manifest field compression.has_cls should be a boolean.")
    if rows * cols + int(c.has_cls) != n:
        _fail(f"manifest field compression.grid {rows}x{cols}{' + [CLS]' if c.has_cls else ''} does not give "
              f"compression.n_visual {n} visual tokens.")
    stage = _choice(c.stage, "compression.stage", ("vision", "llm"))
    per_layer = _list(c.kv_visual_per_layer, "compression.kv_visual_per_layer", L)
    for i, v in enumerate(per_layer):
        _int(v, f"compression.kv_visual_per_layer[{i}]", 1, n)
    graph_names = {"vision", "llm"}
    if stage == "vision":
        if c.work_layer is not None or c.selector is not None:
            _fail("manifest fields compression.work_layer and compression.selector must be null for stage 'vision'.")
        want = [k] * L
    else:
        if L < 2:
            _fail("manifest field compression.stage is 'llm' but the LLM has one layer, so it cannot be split.")
        w = _int(c.work_layer, "compression.work_layer", 1, L - 1)
        if c.selector is None:
            _fail("manifest field compression.selector is null; stage 'llm' needs the runtime selection's name.")
        _str(c.selector, "compression.selector")
        sel = selectors.get(c.selector)
        want = [k] * L if sel.trims_pre_kv else [n] * w + [k] * (L - w)
        graph_names = {"vision", "llm_pre", "llm_post", *sel.graphs}
        for key, (lo, hi) in sel.option_bounds.items():
            if key not in c.options:
                _fail(f"manifest field compression.options has no {key!r}, which selector {c.selector!r} reads.")
            _num(c.options[key], f"compression.options.{key}", lo, hi)
    if per_layer != want:
        _fail(f"manifest field compression.kv_visual_per_layer is {_short(per_layer)}; with N={n}, K={k} and this "
              f"stage it must be {_short(want)}.")
    # text
    max_len = _int(t.max_seq_len, "text.max_seq_len", 2, LIMITS["seq_len"])
    budget = _int(t.budget, "text.budget", 1, max_len)
    if max(want) + budget + 1 > max_len:
        _fail(f"manifest field text.max_seq_len {max_len} cannot hold {max(want)} visual + {budget} text tokens "
              "and one generated token.")
    eos = _list(t.eos_token_ids, "text.eos_token_ids", max_len=LIMITS["eos_ids"])
    for i, e in enumerate(eos):
        _int(e, f"text.eos_token_ids[{i}]", 0, vocab - 1)
    if t.chat_template is not None and t.chat_template != CHAT_TEMPLATE:
        _fail(f"manifest field text.chat_template is {_short(t.chat_template)}; the runtime reads the template from "
              f"{CHAT_TEMPLATE!r}, so it must be that or null.")
    if not isinstance(t.tokenizer_as_is, bool):
        _fail("manifest field text.tokenizer_as_is should be a boolean.")
    # KV cache
    _validate_kv(kv, L, kvh, dh, max_len)
    # graphs, embeddings, preprocessing, files, engines
    _validate_graphs(m, graph_names, n, k, d, vocab, L, max_len, budget)
    emb = _dict(m.embeddings, "embeddings", {"file", "dtype", "shape"})
    check_path(emb["file"], "embeddings.file")
    edt = _choice(emb["dtype"], "embeddings.dtype", FLOAT_DTYPES)
    shape = _list(emb["shape"], "embeddings.shape", 2)
    if [type(s) for s in shape] != [int, int] or shape != [vocab, d]:
        _fail(f"manifest field embeddings.shape is {_short(shape)}; it must be [lm.vocab_size, lm.hidden_size] = "
              f"[{vocab}, {d}].")
    if vocab * d * np.dtype(edt if edt != "bfloat16" else "float16").itemsize > LIMITS["embed_bytes"]:
        _fail(f"manifest field embeddings.shape {shape} is larger than {LIMITS['embed_bytes']} bytes.")
    first = "llm" if stage == "vision" else "llm_pre"
    act = next(x.dtype for x in m.graphs[first].inputs if x.name == "inputs_embeds")
    if edt != act:
        _fail(f"manifest field embeddings.dtype is {edt}, but graph {first}'s inputs_embeds is {act}: the runtime "
              "feeds the table's rows to it.")
    graph_dtype = getattr(m, "dtype", act)  # build --dtype (a default for manifests written before the field)
    if _choice(graph_dtype, "dtype", FLOAT_DTYPES) != act:
        _fail(f"manifest field dtype is {graph_dtype}, but the graphs compute in {act}.")
    _validate_preprocess(m)
    files = _dict(m.files, "files")
    if len(files) > LIMITS["files"]:
        _fail(f"manifest field files lists {len(files)} files; at most {LIMITS['files']} are allowed.")
    for rel, meta in files.items():
        check_path(rel, f"files[{rel!r}]")
        _dict(meta, f"files[{rel!r}]", {"sha256", "bytes"})
        if not isinstance(meta["sha256"], str) or not _HEX64.fullmatch(meta["sha256"]):
            _fail(f"manifest field files[{rel!r}].sha256 is not 64 lowercase hex digits.")
        _int(meta["bytes"], f"files[{rel!r}].bytes", 0, LIMITS["file_bytes"])
    if m.engines is not None:
        _validate_engines(m.engines, m.graphs)
    if getattr(m, "weights", None) is not None:
        _validate_weights(m.weights, m.graphs)


def _validate_kv(kv, L: int, kvh: int, dh: int, max_len: int) -> None:
    from vtc.runtime.kv_cache import storage_dtype

    dtype = _choice(kv.dtype, "kv_cache.dtype", KV_DTYPES)
    layers = _list(kv.layer_dtypes, "kv_cache.layer_dtypes", L)
    allowed = (dtype, "float16") if dtype in QUANTIZED_KV else (dtype,)
    for i, ld in enumerate(layers):
        _choice(ld, f"kv_cache.layer_dtypes[{i}]", allowed)
    try:
        sizes = [storage_dtype(ld).itemsize for ld in layers]
    except TypeError:
        _fail(f"manifest field kv_cache.dtype {dtype} is not a cache dtype this runtime can hold.",
              "Rebuild the artifact with --kv-cache fp32, fp16, int8 or fp8.")
    fallback = _list(kv.fallback_layers, "kv_cache.fallback_layers", max_len=L)
    want_fallback = [i for i, ld in enumerate(layers) if ld != dtype]
    if fallback != want_fallback:
        _fail(f"manifest field kv_cache.fallback_layers is {_short(fallback)}; kv_cache.layer_dtypes says "
              f"{want_fallback}.")
    _str(kv.layout, "kv_cache.layout", LIMITS["text_chars"])
    per_token = sum(2 * kvh * dh * s for s in sizes)
    _int(kv.bytes_per_token, "kv_cache.bytes_per_token", per_token, per_token)
    if per_token * max_len > LIMITS["kv_bytes"]:
        _fail(f"the KV cache would be {per_token * max_len} bytes at text.max_seq_len {max_len}; at most "
              f"{LIMITS['kv_bytes']} are allowed.")
    _int(kv.bytes_total, "kv_cache.bytes_total", per_token * max_len, per_token * max_len)
    if dtype in QUANTIZED_KV:
        if kv.scales is None:
            _fail(f"manifest field kv_cache.scales is null; a {dtype} cache is built with a scales file.")
        check_path(kv.scales, "kv_cache.scales")
    elif kv.scales is not None:
        _fail(f"manifest field kv_cache.scales names a file, but a {dtype} cache has no scales.")
    if kv.scale_source is not None:
        _str(kv.scale_source, "kv_cache.scale_source", LIMITS["text_chars"])
    _dict(kv.accuracy, "kv_cache.accuracy")


def _tensor_list(specs, where: str) -> list:
    _list(specs, where, max_len=LIMITS["tensors"])
    names = set()
    for i, s in enumerate(specs):
        w = f"{where}[{i}]"
        name = _str(s.name, f"{w}.name")
        if name in names:
            _fail(f"manifest field {w}.name {name!r} appears twice.")
        names.add(name)
        _choice(s.dtype, f"{w}.dtype", sorted(TENSOR_DTYPES))
        _list(s.shape, f"{w}.shape", max_len=LIMITS["dims"])
        for j, dim in enumerate(s.shape):
            if isinstance(dim, str):
                if not _SYMBOL.fullmatch(dim) or len(dim) > 64:
                    _fail(f"manifest field {w}.shape[{j}] is {_short(dim)}: a symbolic dimension is a name such as "
                          "'seq', optionally '- N' or '+ N'.")
            else:
                _int(dim, f"{w}.shape[{j}]", 0, LIMITS["dim"])
    return [(s.name, s.dtype, list(s.shape)) for s in specs]


def _expect_io(name: str, kind: str, got: list, want: list) -> None:
    """got/want: [(name, dtype or a tuple of dtypes, shape)] in order (inputs: any order)."""
    if kind == "inputs":
        got, want = sorted(got, key=lambda x: x[0]), sorted(want, key=lambda x: x[0])
    if [g[0] for g in got] != [w[0] for w in want]:
        _fail(f"manifest graph {name!r} has {kind} {_short([g[0] for g in got])}; the runtime "
              f"{'feeds' if kind == 'inputs' else 'reads'} {_short([w[0] for w in want])}.")
    for (tn, dtype, shape), (_, wd, ws) in zip(got, want):
        if dtype not in (wd if isinstance(wd, tuple) else (wd,)) or shape != ws:
            _fail(f"manifest graph {name!r} {kind[:-1]} {tn} is {dtype}{shape}; the runtime needs "
                  f"{wd if isinstance(wd, str) else '|'.join(wd)}{ws}.")


def _validate_graphs(m, names: set, n: int, k: int, d: int, vocab: int, L: int, max_len: int, budget: int) -> None:
    from vtc.runtime import positions

    graphs = _dict(m.graphs, "graphs")
    if set(graphs) != names:
        _fail(f"manifest field graphs has {sorted(graphs)}; an artifact of stage {m.compression.stage!r} "
              f"{'with selector ' + repr(m.compression.selector) + ' ' if m.compression.selector else ''}has "
              f"exactly {sorted(names)}.")
    files = {}
    io = {}
    for gname, spec in graphs.items():
        f = check_path(spec.file, f"graphs.{gname}.file")
        if f in files:
            _fail(f"manifest graphs {files[f]!r} and {gname!r} name the same file {f!r}.")
        files[f] = gname
        io[gname] = (_tensor_list(spec.inputs, f"graphs.{gname}.inputs"),
                     _tensor_list(spec.outputs, f"graphs.{gname}.outputs"))
        _validate_profiles(gname, spec, max_len)
    kv_dt = list(m.kv_cache.layer_dtypes)
    kv_in = lambda kind, rng, dim: [(f"{kind}_{kv}.{i}", kv_dt[i], [1, m.lm.num_kv_heads, dim, m.lm.head_dim])  # noqa: E731
                                    for i in rng for kv in ("key", "value")]
    kv_out = lambda rng: kv_in("present", rng, "seq")  # noqa: E731
    vis_k = k if m.compression.stage == "vision" else n
    vin, vout = io["vision"]
    if len(vin) != 1 or vin[0][0] != "pixel_values" or len(vin[0][2]) != 4:
        _fail(f"manifest graph 'vision' has inputs {_short([x[0] for x in vin])}; the runtime feeds "
              "['pixel_values'] [1, 3, H, W].")
    hw = vin[0][2][2:]
    if [type(x) for x in hw] != [int, int] or not all(1 <= x <= LIMITS["image_side"] for x in hw):
        _fail(f"manifest graph 'vision' input pixel_values has shape {vin[0][2]}; H and W must be integers in "
              f"[1, {LIMITS['image_side']}].")
    images = _images(m)  # a tiling processor's tiles + global image go through the graph as one batch
    _expect_io("vision", "inputs", vin, [("pixel_values", FLOAT_DTYPES, [images, 3, *hw])])
    _expect_io("vision", "outputs", vout, [("image_embeds", FLOAT_DTYPES, [1, vis_k, d]),
                                           ("kept_index", "int64", [1, vis_k]), ("token_map", "int64", [1, n])])
    segments = ({"llm": (0, L, True)} if m.compression.stage == "vision"
                else {"llm_pre": (0, m.compression.work_layer, False), "llm_post": (m.compression.work_layer, L, True)})
    for gname, (first, end, head) in segments.items():
        gin, gout = io[gname]
        act = [x[1] for x in gin if x[0] in ("inputs_embeds", "hidden_states")]
        act = act[0] if act and act[0] in FLOAT_DTYPES else FLOAT_DTYPES
        want_in = [("inputs_embeds" if first == 0 else "hidden_states", act, [1, "seq", d]),
                   ("position_ids", "int64", [*positions.get(m.lm.rope).lead, "seq"]),  # [1, S] or [3, 1, S]
                   ("past_lengths", "int64", [end - first]),
                   *kv_in("past", range(first, end), "past_seq")]
        if head:
            want_in.append(("logits_index", "int64", [1]))
            want_out = [("logits", FLOAT_DTYPES, [1, vocab]), *kv_out(range(first, end))]
        else:
            want_out = [("hidden_states", act, [1, "seq", d]), ("last_attn", FLOAT_DTYPES, [1, "seq"]),
                        *kv_out(range(first, end))]
        _expect_io(gname, "inputs", gin, want_in)
        _expect_io(gname, "outputs", gout, want_out)
        visual = n if gname == "llm_pre" else k
        profiles = graphs[gname].profiles
        # decode: the cache at its capacity bucket (vtc.runtime.kv_cache), [MIN_BUCKET, max_seq_len]; artifacts
        # built before capacity buckets fed the whole buffer (past_seq = max_seq_len)
        from vtc.runtime.kv_cache import MIN_BUCKET

        buckets = {"seq": 1, "past_seq": [min(MIN_BUCKET, max_len), max_len]}
        want_prof = {"prefill": {"seq": [visual + 1, visual + budget], "past_seq": 0}, "decode": buckets}
        for pname, dims in want_prof.items():
            if pname == "decode" and profiles.get(pname) == {"seq": 1, "past_seq": max_len}:
                continue
            if profiles.get(pname) != dims:
                _fail(f"manifest field graphs.{gname}.profiles.{pname} is {_short(profiles.get(pname))}; with "
                      f"text.budget {budget} and text.max_seq_len {max_len} it must be {dims}.")


def _validate_profiles(gname: str, spec, max_len: int) -> None:
    where = f"graphs.{gname}.profiles"
    profiles = _dict(spec.profiles, where)
    symbols = {d for t in spec.inputs for d in t.shape if isinstance(d, str)}
    if symbols and not profiles:
        _fail(f"manifest field {where} is empty, but the graph's inputs have symbolic dimensions {sorted(symbols)}.")
    for pname, dims in profiles.items():
        _str(pname, f"{where} name")
        _dict(dims, f"{where}.{pname}")
        for dim, value in dims.items():
            w = f"{where}.{pname}.{dim}"
            if isinstance(value, str):
                _str(value, w)
            elif isinstance(value, list):
                lo, hi = (_int(x, f"{w}[{i}]", 0, max_len) for i, x in enumerate(_list(value, w, 2)))
                if lo > hi:
                    _fail(f"manifest field {w} is [{lo}, {hi}]: the low end is above the high end.")
            else:
                _int(value, w, 0, max_len)
        missing = symbols - set(dims)
        if missing:
            _fail(f"manifest field {where}.{pname} does not set the graph's dimensions {sorted(missing)}.")


def _validate_preprocess(m) -> None:
    from vtc.runtime.preprocess import ImagePreprocessor

    cfg = _dict(m.preprocess, "preprocess")
    try:
        pp = ImagePreprocessor.from_config(cfg, error=ArtifactError)
        normal = pp.to_dict()
    except VtcError as e:
        _fail(f"manifest field preprocess: {e.what}", REBUILD)
    if normal != cfg or any(type(normal[key]) is not type(cfg[key]) and not isinstance(normal[key], float)
                            for key in normal):
        diff = sorted(key for key in set(normal) | set(cfg) if normal.get(key, ...) != cfg.get(key, ...)
                      or type(normal.get(key)) is not type(cfg.get(key)))
        _fail(f"manifest field preprocess is not in vtc's normalised form (keys {diff[:6]} differ).")
    sides = [x for x in (pp.shortest_edge, *(pp.resize_hw or ()), *(pp.crop_hw or ())) if x is not None]
    for x in sides:
        if not 1 <= x <= LIMITS["image_side"]:
            _fail(f"manifest field preprocess resizes or crops to {x} pixels; sides must be in "
                  f"[1, {LIMITS['image_side']}].")
    # pixel statistics: [0, 1] after rescaling, or [0, 255] for processors that do not rescale
    for i, v in enumerate(pp.image_mean):
        _num(v, f"preprocess.image_mean[{i}]", 0.0, 255.0)
    # no real processor divides by a std below 1e-3 or rescales by less than 1e-4 (1/255 and 1 are the usual);
    # values down there (a denormal, say) only turn every image into the same saturated input
    for i, v in enumerate(pp.image_std):
        _num(v, f"preprocess.image_std[{i}]", 1e-3, 255.0)
    _num(pp.rescale_factor, "preprocess.rescale_factor", 1e-4, 1.0)
    hw = pp.output_hw
    want = m.graphs["vision"].inputs[0].shape[2:]
    if hw is None or list(hw) != list(want):
        _fail(f"manifest field preprocess gives images of {'varying size' if hw is None else list(hw)}; the vision "
              f"graph takes {want}.")


def _images(m) -> int:
    """Images per prompt (vtc.runtime.tiling: R*C tiles + the global image, else 1). The image prompt must
    place that many blocks, and N and K must split evenly over them (the runtime places K/B per block)."""
    from vtc.runtime.preprocess import ImagePreprocessor

    try:
        images = getattr(ImagePreprocessor.from_config(_dict(m.preprocess, "preprocess"), error=ArtifactError),
                         "num_images", 1)
    except VtcError as e:
        _fail(f"manifest field preprocess: {e.what}", REBUILD)
    prompt = m.text.image_prompt
    if prompt is not None:
        _str(prompt, "text.image_prompt", 65536)  # 12 x 12 tiles of per-tile text: ~7,000 characters
        if prompt.count(m.model.image_token) != images:
            _fail(f"manifest field text.image_prompt places {prompt.count(m.model.image_token)} image blocks; the "
                  f"preprocessing makes {images} images.")
    elif images != 1:
        _fail(f"manifest field preprocess makes {images} images, but text.image_prompt (where they go) is null.")
    if m.compression.n_visual % images or m.compression.k_visual % images:
        _fail(f"manifest fields compression.n_visual {m.compression.n_visual} and k_visual {m.compression.k_visual} "
              f"do not split evenly over {images} images.")
    return images


def _validate_engines(e, graphs: dict) -> None:
    _str(e.tensorrt_version, "engines.tensorrt_version")
    _str(e.device, "engines.device")
    if not isinstance(e.compute_capability, str) or not re.fullmatch(r"[0-9]{1,3}\.[0-9]{1,3}", e.compute_capability):
        _fail(f"manifest field engines.compute_capability is {_short(e.compute_capability)}; it must look like '8.7'.")
    _choice(e.precision, "engines.precision", ENGINE_PRECISIONS)
    _dict(e.options, "engines.options")
    engine_files = set()
    for name, entry in _dict(e.graphs, "engines.graphs").items():
        w = f"engines.graphs.{name}"
        if name not in graphs:
            _fail(f"manifest field {w} is an engine for a graph the artifact does not have.")
        _dict(entry, w, {"file", "profiles", "quantized"})
        f = check_path(entry["file"], f"{w}.file")
        if f in engine_files or any(g.file == f for g in graphs.values()):
            _fail(f"manifest field {w}.file {f!r} is named twice.")
        engine_files.add(f)
        for key in ("profiles", "quantized"):
            for i, x in enumerate(_list(entry[key], f"{w}.{key}", max_len=64)):
                _str(x, f"{w}.{key}[{i}]")


WEIGHT_DTYPES, WEIGHT_ALGOS = ("int8", "int4"), ("rtn", "awq")
WEIGHT_GRAPH_KEYS = {"layers", "lm_head", "bytes_before", "bytes_after", "data_bytes_before", "data_bytes_after", "opset",
                     "clipped"}  # and "matmuls" (quantized MatMul nodes after fusing siblings), absent before vtc 0.1's fusion


def _validate_weights(w, graphs: dict) -> None:
    """The `weights` entry (build --weights): what it says must be self-consistent; the graphs' own
    DequantizeLinear nodes are what the runtime executes."""
    dtype = _choice(w.dtype, "weights.dtype", WEIGHT_DTYPES)
    _choice(w.algo, "weights.algo", WEIGHT_ALGOS)
    if dtype == "int4":
        g = _int(w.group_size, "weights.group_size", 16, LIMITS["hidden_size"])
        if g & (g - 1):
            _fail(f"manifest field weights.group_size is {g}; it must be a power of two.")
    elif w.group_size is not None:
        _fail("manifest field weights.group_size must be null for int8 weights (one scale per output channel).")
    if w.algo == "awq" and dtype != "int4":
        _fail("manifest field weights.algo is awq, which vtc only searches for int4 weights.")
    if not isinstance(w.lm_head, bool):
        _fail("manifest field weights.lm_head should be a boolean.")
    per_graph = _dict(w.graphs, "weights.graphs")
    if not per_graph or set(per_graph) - set(graphs):
        _fail(f"manifest field weights.graphs names {_short(sorted(per_graph))}; it must name graphs of this artifact.")
    totals = {"layers": 0, "bytes_before": 0, "bytes_after": 0}
    for name, entry in per_graph.items():
        _dict(entry, f"weights.graphs.{name}", WEIGHT_GRAPH_KEYS | ({"matmuls"} if "matmuls" in entry else set()))
        for key in set(entry) - {"lm_head"}:
            _int(entry[key], f"weights.graphs.{name}.{key}", 0, LIMITS["file_bytes"])
        if entry.get("matmuls", 0) > entry["layers"]:
            _fail(f"manifest field weights.graphs.{name}.matmuls is {entry['matmuls']}, more than its {entry['layers']} "
                  "quantized layers.")
        for key in totals:
            totals[key] += entry[key]
    for key, total in totals.items():
        _int(getattr(w, key), f"weights.{key}", total, total)
    if w.layers < 1:
        _fail("manifest field weights.layers is 0; a weights entry is written only when layers were quantized.")
    if w.min_tensorrt is not None and not re.fullmatch(r"[0-9]{1,3}(\.[0-9]{1,3}){1,3}", str(w.min_tensorrt)):
        _fail(f"manifest field weights.min_tensorrt is {_short(w.min_tensorrt)}; it must look like '10.15'.")
    _dict(w.awq, "weights.awq")
    _dict(w.accuracy, "weights.accuracy")


def referenced_files(m) -> dict[str, str]:
    """Every file the manifest names: path -> the field naming it."""
    refs = {spec.file: f"graphs.{name}.file" for name, spec in m.graphs.items()}
    refs[m.embeddings["file"]] = "embeddings.file"
    if m.text.chat_template is not None:
        refs[m.text.chat_template] = "text.chat_template"
    if m.kv_cache.scales is not None:
        refs[m.kv_cache.scales] = "kv_cache.scales"
    if m.engines is not None:
        refs.update({entry["file"]: f"engines.graphs.{name}.file" for name, entry in m.engines.graphs.items()})
    return refs


# -- the directory ---------------------------------------------------------------------------------
def level(check_files) -> str | None:
    """`check_files` as a level: False/None = no file checks, True = "hashes", or "sizes" / "hashes"."""
    if check_files is False or check_files is None:
        return None
    if check_files is True:
        return "hashes"
    if check_files in LEVELS:
        return check_files
    raise UsageError(f"check_files={check_files!r} is not a file-check level.", "Pass 'sizes', 'hashes' or False.")


def check_files(artifact_dir: Path, m, check: str) -> None:
    """The listed files of `artifact_dir` against manifest `m` at level `check` ("sizes" or "hashes")."""
    root = Path(artifact_dir)
    refs = referenced_files(m)
    for rel, field in refs.items():
        if rel not in m.files:
            _fail(f"{field} names {rel!r}, which the manifest's files table does not list: vtc will not read an "
                  "unlisted (unverified) file.", REBUILD)
    for rel in RUNTIME_READS:
        if rel not in m.files and (rel == "tokenizer.json" or os.path.lexists(root / rel)):
            _fail(f"artifact file {root / rel} is read by the runtime but not listed in the manifest's files table.",
                  "Remove the file if you added it, or rebuild the artifact.")
    if (CHAT_TEMPLATE in m.files) != (m.text.chat_template is not None):
        _fail(f"text.chat_template is {m.text.chat_template!r}, but the files table "
              f"{'lists' if CHAT_TEMPLATE in m.files else 'does not list'} {CHAT_TEMPLATE!r}, which the runtime reads "
              "when it is there.", REBUILD)
    for rel, meta in m.files.items():
        _check_file(root, rel, meta, check)
    for name, spec in m.graphs.items():
        _check_graph(root, name, spec, m.files)
    _check_embeddings(root, m.embeddings)
    _check_eos(root, m)
    _check_preprocess(root, m)


def _open_inside(root: Path, rel: str) -> int:
    """An O_RDONLY descriptor of root/rel, reached without following any symlink below root."""
    parts = rel.split("/")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    dflags = flags | getattr(os, "O_DIRECTORY", 0)
    fd = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                st = os.lstat(part, dir_fd=fd)
            except FileNotFoundError:
                _fail(f"artifact file {root / rel} is missing.", "The artifact is incomplete: rebuild it.")
            if stat.S_ISLNK(st.st_mode):
                _fail(f"artifact file {root / rel} is reached through a symlink ({'/'.join(parts[:i + 1])}): "
                      "artifact files must be regular files inside the artifact directory.", REBUILD)
            if not last and not stat.S_ISDIR(st.st_mode):
                _fail(f"artifact file {root / rel} is missing ({'/'.join(parts[:i + 1])} is not a directory).",
                      "The artifact is incomplete: rebuild it.")
            if last and not stat.S_ISREG(st.st_mode):
                _fail(f"artifact file {root / rel} is not a regular file.", REBUILD)
            nfd = os.open(part, flags if last else dflags, dir_fd=fd)
            os.close(fd)
            fd = nfd
        return fd
    except OSError as e:
        os.close(fd)
        _fail(f"cannot read artifact file {root / rel} ({e.strerror or e}).", "Check its permissions, or rebuild it.")
    except BaseException:
        os.close(fd)
        raise


def _check_file(root: Path, rel: str, meta: dict, check: str) -> None:
    fd = _open_inside(root, rel)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size != meta["bytes"]:
            _fail(f"checksum mismatch for {root / rel}: it is {size} bytes, the manifest's checksum table says "
                  f"{meta['bytes']}; the file changed after the build.",
                  "Rebuild the artifact (or restore the file); vtc will not run modified graphs.")
        if check == "hashes" or size <= SMALL_FILE_BYTES:
            h = hashlib.sha256()
            while block := f.read(1 << 22):
                h.update(block)
            if h.hexdigest() != meta["sha256"]:
                _fail(f"checksum mismatch for {root / rel}: the file changed after the build.",
                      "Rebuild the artifact (or restore the file); vtc will not run modified graphs.")


def _check_graph(root: Path, name: str, spec, files: dict) -> None:
    """The ONNX file's declared inputs/outputs equal the manifest's; its external data files are listed."""
    path = root / spec.file
    try:
        inputs, outputs, external = scan_onnx(path)
    except (_Malformed, ValueError, OSError) as e:
        _fail(f"vtc could not load {path} as an ONNX graph ({e or 'malformed protobuf'}).", "Rebuild the artifact.")
    want_in = [(t.name, t.dtype, list(t.shape)) for t in spec.inputs]
    want_out = [(t.name, t.dtype, list(t.shape)) for t in spec.outputs]
    for kind, got, want in (("inputs", inputs, want_in), ("outputs", outputs, want_out)):
        if got != want:
            _fail(f"graph {name}: {path} declares {kind} {_short([g[0] for g in got])} "
                  f"{'' if [g[0] for g in got] != [w[0] for w in want] else '(with other dtypes or shapes) '}"
                  f"but the manifest says {_short([w[0] for w in want])}: the file is not this graph.", REBUILD)
    parent = spec.file.rpartition("/")[0]
    for loc in sorted(external):
        check_path(loc, f"external data of {spec.file}")
        rel = f"{parent}/{loc}" if parent else loc
        if rel not in files:
            _fail(f"graph {name}: {spec.file} reads external data {rel!r}, which the manifest's files table does "
                  "not list.", REBUILD)


def _check_embeddings(root: Path, emb: dict) -> None:
    path = root / emb["file"]
    fd = _open_inside(root, emb["file"])
    with os.fdopen(fd, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in reader:
                raise ValueError(f"npy format version {version}")
            shape, fortran, dtype = reader[version](f)
        except (ValueError, OSError, SyntaxError, TypeError) as e:
            _fail(f"embeddings.file {path} is not a .npy array ({e}).", REBUILD)
        offset, size = f.tell(), os.fstat(f.fileno()).st_size
    want = emb["dtype"]
    same_dtype = dtype.name == want or (want == "bfloat16" and dtype.itemsize == 2 and dtype.kind in "Vu")  # raw bits
    if dtype.hasobject or fortran or not same_dtype or list(shape) != list(emb["shape"]):
        _fail(f"embeddings.file {path} holds {dtype}{list(shape)}{' (Fortran order)' if fortran else ''}; the manifest "
              f"says {want}{emb['shape']}.", REBUILD)
    expected = offset + math.prod(shape) * dtype.itemsize
    if expected != size:
        _fail(f"embeddings.file {path} is {size} bytes; its header says {expected}.", REBUILD)


def _read_json_inside(root: Path, rel: str):
    """A listed JSON file of the artifact (opened without following symlinks), parsed; one error if it is not JSON."""
    fd = _open_inside(root, rel)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(LIMITS["manifest_bytes"] + 1)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        _fail(f"artifact file {root / rel} is not valid UTF-8 JSON.", REBUILD)


def _check_eos(root: Path, m) -> None:
    """The runtime's tokenizer side reads EOS ids from generation_config.json / config.json
    (vtc.runtime.text._eos_ids); where a listed file gives them, they must be the manifest's."""
    for rel in ("generation_config.json", "config.json"):
        if rel not in m.files:
            continue
        cfg = _read_json_inside(root, rel)
        if not isinstance(cfg, dict):
            _fail(f"artifact file {root / rel} is not a JSON object.", REBUILD)
        text_cfg = cfg.get("text_config") if rel == "config.json" else None
        candidates = [cfg.get("eos_token_id"), text_cfg.get("eos_token_id") if isinstance(text_cfg, dict) else None]
        value = next((v for v in candidates if v is not None), None)
        if value is None:
            continue
        ids = value if isinstance(value, list) else [value]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids) or set(ids) != set(m.text.eos_token_ids):
            _fail(f"artifact file {root / rel} gives EOS ids {_short(value)}; the manifest's text.eos_token_ids are "
                  f"{m.text.eos_token_ids}.", REBUILD)
        return


PREPROCESS_FILE = "preprocess.json"  # the build's copy of the manifest's `preprocess` (vtc.export.assets)


def _check_preprocess(root: Path, m) -> None:
    """Preprocessing values are plausible over wide ranges (a mean of 0 is valid), so range checks cannot tell
    an edited manifest from a real build: the build also writes them to preprocess.json, listed and hashed,
    and the manifest's must equal it (artifacts built before it existed have none)."""
    if PREPROCESS_FILE not in m.files:
        return
    if _read_json_inside(root, PREPROCESS_FILE) != m.preprocess:
        _fail(f"manifest field preprocess differs from the build's {PREPROCESS_FILE}.", REBUILD)


def digest(manifest_bytes: bytes) -> str:
    """The artifact digest: sha256 of manifest.json's bytes (the manifest lists every file's sha256)."""
    return hashlib.sha256(manifest_bytes).hexdigest()


# -- ONNX, read without the onnx package -----------------------------------------------------------
class _Malformed(Exception):
    pass


ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "object",
               9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64", 14: "complex64",
               15: "complex128", 16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz", 19: "float8_e5m2",
               20: "float8_e5m2fnuz"}


def _varint(buf, i: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= end or shift > 63:
            raise _Malformed("truncated or malformed varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value): varints as ints, length-delimited fields as (start, end)."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        fn, wt = key >> 3, key & 7
        if wt == 0:
            value, i = _varint(buf, i, end)
            yield fn, wt, value
        elif wt == 2:
            length, i = _varint(buf, i, end)
            if i + length > end:
                raise _Malformed("a field runs past the end of its message")
            yield fn, wt, (i, i + length)
            i += length
        elif wt in (1, 5):
            i += 8 if wt == 1 else 4
        else:
            raise _Malformed(f"wire type {wt}")
    if i != end:
        raise _Malformed("a field runs past the end of its message")


def _sub(fields, want_fn: set):
    for fn, wt, v in fields:
        if fn in want_fn:
            if wt != 2:
                raise _Malformed(f"field {fn} is not a message")
            yield fn, v


def _text(buf, span) -> str:
    try:
        return bytes(buf[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Malformed("a name is not UTF-8") from e


def scan_onnx(path: Path) -> tuple[list, list, set]:
    """(inputs, outputs, external data locations) of an ONNX model file: inputs/outputs as
    [(name, dtype, shape)] exactly as vtc.export.onnx_export.graph_spec records them; reads only the
    protobuf structure (tensor data is skipped, the file is memory-mapped)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise _Malformed("empty file")
        if size <= SMALL_FILE_BYTES:  # faster than mapping a small file
            return _scan_model(f.read(), size)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _scan_model(buf, size)


def _scan_model(buf, size: int) -> tuple[list, list, set]:
    out = {"inputs": [], "outputs": [], "external": set(), "graphs": 0}
    for fn, span in _sub(_fields(buf, 0, size), {7, 20, 25}):
        if fn == 7:
            out["graphs"] += 1
            _scan_graph(buf, span, out, 0, top=True)
        elif fn == 20:  # TrainingInfoProto: initialization, algorithm graphs
            for _, g in _sub(_fields(buf, *span), {1, 2}):
                _scan_graph(buf, g, out, 1, top=False)
        else:  # FunctionProto nodes
            for _, node in _sub(_fields(buf, *span), {7}):
                _scan_node(buf, node, out, 1)
    if out["graphs"] != 1:
        raise _Malformed("no graph")
    return out["inputs"], out["outputs"], out["external"]


def _scan_graph(buf, span, out: dict, depth: int, top: bool) -> None:
    if depth > 32:
        raise _Malformed("subgraphs nested too deeply")
    for fn, sub in _sub(_fields(buf, *span), {1, 5, 11, 12, 15}):
        if fn == 1:
            _scan_node(buf, sub, out, depth)
        elif fn == 5:
            _scan_tensor(buf, sub, out)
        elif fn == 15:
            for _, t in _sub(_fields(buf, *sub), {1, 2}):
                _scan_tensor(buf, t, out)
        elif top:
            out["inputs" if fn == 11 else "outputs"].append(_value_info(buf, sub))


def _scan_node(buf, span, out: dict, depth: int) -> None:
    for _, attr in _sub(_fields(buf, *span), {5}):
        for fn, sub in _sub(_fields(buf, *attr), {5, 6, 10, 11, 22, 23}):
            if fn in (5, 10):
                _scan_tensor(buf, sub, out)
            elif fn in (6, 11):
                _scan_graph(buf, sub, out, depth + 1, top=False)
            else:
                for _, t in _sub(_fields(buf, *sub), {1, 2}):
                    _scan_tensor(buf, t, out)


def _scan_tensor(buf, span, out: dict) -> None:
    external = False
    locations = []
    for fn, wt, v in _fields(buf, *span):
        if fn == 14 and wt == 0:
            external = v == 1
        elif fn == 13 and wt == 2:
            entry = dict.fromkeys(("key", "value"), "")
            for efn, ewt, ev in _fields(buf, *v):
                if efn in (1, 2) and ewt == 2:
                    entry["key" if efn == 1 else "value"] = _text(buf, ev)
            if entry["key"] == "location":
                locations.append(entry["value"])
    if external and len(locations) != 1:
        raise _Malformed("an external tensor without one location")
    out["external"].update(locations)


def _value_info(buf, span) -> tuple:
    name, dtype, shape = "", None, []
    for fn, wt, v in _fields(buf, *span):
        if fn == 1 and wt == 2:
            name = _text(buf, v)
        elif fn == 2 and wt == 2:
            for _, tensor in _sub(_fields(buf, *v), {1}):  # TypeProto.tensor_type
                for tfn, twt, tv in _fields(buf, *tensor):
                    if tfn == 1 and twt == 0:
                        dtype = ONNX_DTYPES.get(tv, f"onnx-type-{tv}")
                    elif tfn == 2 and twt == 2:
                        for _, dim in _sub(_fields(buf, *tv), {1}):
                            value, param = 0, ""
                            for dfn, dwt, dv in _fields(buf, *dim):
                                if dfn == 1 and dwt == 0:
                                    value = dv - (1 << 64) if dv >= 1 << 63 else dv
                                elif dfn == 2 and dwt == 2:
                                    param = _text(buf, dv)
                            shape.append(param if param else value)
    return name, dtype, shape
