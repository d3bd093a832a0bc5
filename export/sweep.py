"""`vtc-export sweep`: build every method x ratio of one checkpoint, profile each, and score its fidelity
against the uncompressed artifact (vtc.export.fidelity) into one table and one chart.

Layout of the output directory (default artifacts/sweep-<model>):

    artifacts/<method>-r<ratio>[-kv<T>][-w<W>]/   the built variants (ratio 1.0 is one shared `none-r1` artifact;
                                   -kv<T>: a KV cache other than fp32, -w<W>: quantized LLM weights, see WEIGHTS)
    sweep-state.json               finished variants, rewritten atomically after each one
    sweep.json, sweep.csv          the table: one row per variant
    sweep.png                      TTFT p50 and greedy agreement against kept tokens, one line per method
    .graph-cache/                  exported graphs shared between variants (see vtc.export.graph_cache)

Resuming: a variant recorded in the state file whose artifact still loads is skipped; an artifact that
was built but not yet scored (interrupted in between) is reused without rebuilding; the settings must
match the state file's, else `--force` starts over.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from vtc.export.build import DEFAULT_MAX_SEQ_LEN, DEFAULT_TEXT_BUDGET, BuildArgs
from vtc.runtime.errors import ArtifactError, UsageError
from vtc.runtime.manifest import UNCOMPRESSED

STATE = "sweep-state.json"
GRAPH_CACHE = ".graph-cache"  # exported graphs shared between variants (vtc.export.graph_cache)
STATE_SCHEMA = "vtc.sweep-state"
COLUMNS = ("variant", "method", "ratio", "kv_cache", "weights", "group_size", "k_visual", "n_visual", "prompt_tokens",
           "ttft_ms_p50", "ttft_ms_p90", "vit_time_ms_p50", "prefill_time_ms_p50", "tpot_ms_p50",
           "generation_throughput_tok_s_p50", "e2e_ms_p50",
           "kv_cache_prompt_bytes", "peak_rss_bytes", "energy_per_query_j", "greedy_agreement",
           "greedy_prefix_tokens", "first_token_kl", "first_token_match", "accuracy", "eval_examples", "build_s",
           "artifact")
# --weights names -> (BuildArgs.weights, BuildArgs.weights_algo): fp = the graph dtype, int8 = per output channel,
# int4 = blocks of --group-size (round to nearest), int4-awq = the same blocks with AWQ scales (vtc.calibration.awq)
WEIGHTS = {"fp": ("fp", "rtn"), "int8": ("int8", "rtn"), "int4": ("int4", "rtn"), "int4-awq": ("int4", "awq")}
DEFAULT_GROUP = BuildArgs().group_size  # the build's --group-size default


@dataclass(frozen=True)
class SweepArgs:
    model: str | None  # None = the built-in demo model
    methods: tuple
    ratios: tuple
    output: str | None = None
    runs: int = 5
    warmup: int = 1
    max_new_tokens: int = 32
    fidelity_tokens: int = 32
    images: tuple = ()  # fidelity images (default: three synthetic ones); the first is profiled
    prompts: tuple = ()  # fidelity prompts (default: two); the first is profiled
    threads: int | None = None
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN
    text_budget: int = DEFAULT_TEXT_BUDGET
    parity_tokens: int = 8
    force: bool = False  # ignore the state file and existing artifacts: start over
    kv_caches: tuple = ("fp32",)  # KV cache storage of the variants (BuildArgs.kv_cache); each one is a variant
    eval_n: int = 0  # task accuracy on this many questions per variant (0 = no accuracy columns)
    eval_dataset: str = "synthetic"  # a JSONL file ({image, question, answer[, type]}) or the synthetic task
    eval_seed: int = 1  # the synthetic task's seed (vtc-export eval's default; held out from the demo's training)
    image_splits: tuple | None = None  # every variant's static image layout (BuildArgs.image_splits): tiling models
    weights: tuple = ("fp",)  # LLM weights of the variants (WEIGHTS names); each one is a variant, like kv_caches
    group_size: int = DEFAULT_GROUP  # int4 block size of every int4 variant (BuildArgs.group_size)


@dataclass(frozen=True)
class Variant:
    method: str
    ratio: float
    kv: str = "fp32"
    weights: str = "fp"  # a WEIGHTS name
    group_size: int | None = None  # int4 variants: the block size (None = DEFAULT_GROUP)

    @property
    def name(self) -> str:
        """e.g. pool-r0.25, pool-r0.25-kvint8-wint8, fastv-r0.25-wint4-awq-g64 (a group only when not the default)."""
        return (f"{self.method}-r{self.ratio:g}" + ("" if self.kv == "fp32" else f"-kv{self.kv}")
                + ("" if self.weights == "fp" else f"-w{weights_label(self.weights, self.group_size, '-g')}"))


def weights_label(weights: str, group_size: int | None, sep: str = " g") -> str:
    """int4-awq, or int4-awq g64 where the group is not the build's default (names use sep="-g")."""
    return weights + (f"{sep}{group_size}" if group_size not in (None, DEFAULT_GROUP) else "")


def plan_variants(args: SweepArgs) -> list[Variant]:
    """The uncompressed fp32-KV fp-weights reference first, then every weights x KV dtype x method x ratio
    (names checked here); ratio 1.0 is one `none` variant per weights x KV dtype."""
    from vtc.export import methods, wquant
    from vtc.export.build import KV_DTYPES

    if not args.methods:
        raise UsageError("--methods is empty.", "Example: --methods pool,cls-attn (see `vtc-export list`).")
    for m in args.methods:
        methods.get(m)
    for r in args.ratios:
        if not 0.0 < r <= 1.0:
            raise UsageError(f"--ratios has {r}: a ratio is the fraction of visual tokens KEPT.", "Use 0 < ratio <= 1.")
    bad = [k for k in args.kv_caches if k not in KV_DTYPES]
    if bad or not args.kv_caches:
        raise UsageError(f"--kv-cache {','.join(bad) or '(empty)'}: not a KV cache type.", f"Use {', '.join(KV_DTYPES)}.")
    bad = [w for w in args.weights if w not in WEIGHTS]
    if bad or not args.weights:
        raise UsageError(f"--weights {','.join(bad) or '(empty)'}: not a weights variant.",
                         f"Use a comma list of {', '.join(WEIGHTS)} (e.g. --weights fp,int8,int4-awq).")
    if any(WEIGHTS[w][0] == "int4" for w in args.weights):
        wquant.check_args("int4", args.group_size, "rtn")  # a power of two >= 16
    out = [Variant(methods.NONE, 1.0)]
    for w in args.weights:
        g = args.group_size if WEIGHTS[w][0] == "int4" else None
        for kv in args.kv_caches:
            out += [Variant(methods.NONE, 1.0, kv, w, g)] if 1.0 in args.ratios else []
            out += [Variant(m, r, kv, w, g) for m in args.methods if methods.get(m).compresses for r in args.ratios
                    if r != 1.0]
    return list(dict.fromkeys(out))


def _settings(args: SweepArgs, model_dir: Path) -> dict:
    keep = ("runs", "warmup", "max_new_tokens", "fidelity_tokens", "images", "prompts", "threads", "max_seq_len",
            "text_budget", "eval_n", "eval_dataset", "eval_seed") + (("image_splits",) if args.image_splits else ())
    # (image_splits only when given: state files of sweeps from before the flag still resume). --weights and
    # --group-size are not settings: like --kv-cache they name variants (-w<W>[-g<G>]), so sweeps with other
    # weights add rows to the same directory (make accuracy)
    return {"model": str(model_dir.resolve()), **{k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in asdict(args).items() if k in keep}}


def check_variants(args: SweepArgs, model_dir: Path, variants: list[Variant], step) -> None:
    """Plan every variant on the model at the sweep's image layout before anything is built, so a method that does
    not apply (cls-attn without a [CLS] token, FastV on tiles) is refused now, naming the methods that do, and not
    after the variants before it were built. Costs one load of the checkpoint (the reference variant's prepare)."""
    from vtc.export import methods
    from vtc.export.build import prepare

    with step("checking the methods against the model"):
        ref = Variant(methods.NONE, 1.0)
        bp = prepare(_build_args(args, model_dir, ref, Path("artifacts") / ref.name), step, check_output=False)
        for v in variants:
            m = methods.get(v.method)
            m.check_lm(bp.lm.num_layers, m.plan(bp.spec, v.ratio, {}))
        check_weights(bp, variants)


def check_weights(bp, variants: list[Variant]) -> None:
    """The quantized variants' LLM layers (Llama-style) and int4 group size (it must divide every input dim; the
    error names the --group-size that fits), on the reference's loaded model."""
    from dataclasses import replace

    from vtc.export import wquant

    for dtype, group in dict.fromkeys((WEIGHTS[v.weights][0], v.group_size) for v in variants if v.weights != "fp"):
        wquant.check_model(replace(bp, args=replace(bp.args, weights=dtype, group_size=group or DEFAULT_GROUP)))


def load_state(root: Path, settings: dict, force: bool) -> dict:
    path = root / STATE
    if force or not path.is_file():
        return {"schema": STATE_SCHEMA, "version": 1, "settings": settings, "variants": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e}).", "Pass --force to start the sweep over.") from e
    if state.get("schema") != STATE_SCHEMA or state.get("settings") != settings:
        old = state.get("settings", {})
        diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
        raise UsageError(f"the sweep in {root} was run with other settings ({diff or 'another format'}).",
                         "Pass --force to start over, or choose another --output.")
    return state


def save_state(root: Path, state: dict) -> None:
    """Atomic: write a temporary file next to it, then rename over the old one."""
    tmp = root / f".{STATE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, root / STATE)


def _build_args(args: SweepArgs, model_dir: Path, v: Variant, out: Path) -> BuildArgs:
    return BuildArgs(model=str(model_dir), method=v.method, ratio=v.ratio, output=str(out), max_seq_len=args.max_seq_len,
                     text_budget=args.text_budget, force=True, parity_tokens=args.parity_tokens, kv_cache=v.kv,
                     image_splits=args.image_splits, weights=WEIGHTS[v.weights][0],
                     group_size=v.group_size or DEFAULT_GROUP, weights_algo=WEIGHTS[v.weights][1])


def _existing(out: Path, bargs: BuildArgs) -> bool:
    """A complete artifact at `out` built with the same arguments (an interrupted sweep's leftover)."""
    from vtc.runtime import manifest as mf

    try:
        m = mf.load(out, check_files="hashes")
    except ArtifactError:
        return False
    keys = ("model", "method", "ratio", "max_seq_len", "text_budget", "method_options", "kv_cache", "image_splits",
            "weights", "group_size", "weights_algo")
    asked = json.loads(json.dumps(asdict(bargs)))  # as the manifest records them (tuples as lists)
    before = {k: getattr(BuildArgs(), k) for k in ("weights", "group_size", "weights_algo")}  # older manifests: no keys
    return all(m.build_args.get(k, before.get(k)) == asked[k] for k in keys)


def build_variant(args: SweepArgs, model_dir: Path, v: Variant, root: Path, step) -> tuple[Path, float]:
    """(artifact, build seconds; 0 when an existing artifact was reused)."""
    from vtc.export import build as build_mod

    out = root / "artifacts" / v.name
    bargs = _build_args(args, model_dir, v, out)
    if not args.force and _existing(out, bargs):
        return out, 0.0
    t0 = time.perf_counter()
    build_mod.build(bargs, step, cache=root / GRAPH_CACHE)
    return out, time.perf_counter() - t0


def profile_variant(args: SweepArgs, art: Path) -> dict:
    from vtc.runtime.profiler import DEFAULT_PROMPT, ProfileConfig, profile

    cfg = ProfileConfig(image=args.images[0] if args.images else None,
                        prompt=args.prompts[0] if args.prompts else DEFAULT_PROMPT, runs=args.runs,
                        warmup=args.warmup, max_new_tokens=args.max_new_tokens, threads=args.threads)
    return profile(art, cfg)


def eval_items(args: SweepArgs) -> list:
    """The accuracy set of every variant (checked once, before anything is built): bad lines stop the sweep."""
    from vtc.runtime import evaluate as ev

    if args.eval_dataset == "synthetic":
        return ev.synthetic(args.eval_seed, args.eval_n)
    items, _ = ev.load_jsonl(Path(args.eval_dataset), "stop", args.eval_n)
    return items


def accuracy_of(vlm, items: list) -> dict:
    """{"accuracy", "eval_examples", "acc_<type>" per question type} for one variant."""
    from vtc.runtime import evaluate as ev

    rep = ev.evaluate(vlm, items, ev.Problems(), "stop")
    return {"accuracy": rep["accuracy"], "eval_examples": rep["examples"],
            **{f"acc_{t}": v["accuracy"] for t, v in rep["per_type"].items()}}


def row_of(v: Variant, art: Path, report: dict, fid: dict, build_s: float) -> dict:
    m, c = report["metrics"], report["compression"]

    def p(key: str, stat: str = "p50"):
        return m[key][stat] if key in m else None

    energy = (report.get("power") or {}).get("energy_per_query_j")
    return {"variant": v.name, "method": c["method"], "ratio": c["ratio"], "kv_cache": v.kv, "weights": v.weights,
            "group_size": v.group_size, "k_visual": c["k_visual"],
            "n_visual": c["n_visual"], "prompt_tokens": report["tokens"]["prompt_tokens"],
            "ttft_ms_p50": p("ttft_ms"), "ttft_ms_p90": p("ttft_ms", "p90"), "vit_time_ms_p50": p("vit_time_ms"),
            "prefill_time_ms_p50": p("prefill_time_ms"), "tpot_ms_p50": p("tpot_ms"),
            "generation_throughput_tok_s_p50": p("generation_throughput_tok_s"), "e2e_ms_p50": p("e2e_ms"),
            "kv_cache_prompt_bytes": report["memory"]["kv_cache_prompt_bytes"],
            "peak_rss_bytes": report["memory"]["peak_rss_bytes"],
            "energy_per_query_j": energy["p50"] if energy else None, **fid, "build_s": round(build_s, 2),
            "artifact": str(art)}


def run_variant(args, model_dir: Path, v: Variant, root: Path, ref, step, built: tuple | None = None,
                items: list | None = None) -> dict:
    from vtc.export import fidelity
    from vtc.runtime.backend import get_backend
    from vtc.runtime.pipeline import VLM

    if built is None:
        with step(f"{v.name}: build"):
            built = build_variant(args, model_dir, v, root, step)
    art, build_s = built
    with step(f"{v.name}: profile ({args.runs} runs)"):
        report = profile_variant(args, art)
    vlm = VLM(art, backend=get_backend(threads=args.threads))
    with step(f"{v.name}: fidelity"):
        fid = fidelity.score(vlm, ref)
    if items:
        with step(f"{v.name}: accuracy ({len(items)} questions)"):
            fid = {**fid, **accuracy_of(vlm, items)}
    return row_of(v, art, report, fid, build_s)


def _done(state: dict, v: Variant) -> bool:
    from vtc.runtime import manifest as mf

    row = state["variants"].get(v.name)
    if row is None:
        return False
    try:
        mf.load(Path(row["artifact"]), check_files=False)
    except ArtifactError:
        return False
    return True


@dataclass
class SweepResult:
    rows: list  # one dict per variant (COLUMNS and more), in plan order
    root: Path  # the sweep directory
    settings: dict


def sweep(args: SweepArgs, step: Callable = lambda _label: contextlib.nullcontext(),
          on_variant: Callable[[int, int, str, str], None] | None = None) -> SweepResult:
    """Build, profile and score every variant not finished before.

    `on_variant(i, n, name, status)` reports progress: status is "skipped" (finished earlier),
    "start" or "done".
    """
    from vtc.export import fidelity, models, placement
    from vtc.export.demo import ensure_demo_checkpoint
    from vtc.runtime.backend import get_backend
    from vtc.runtime.pipeline import VLM

    variants = plan_variants(args)
    model_dir = ensure_demo_checkpoint() if args.model is None else Path(args.model).expanduser()
    models.resolve(model_dir)  # a bad --model (no config.json, not a VLM, unsupported) fails before anything is written
    root = Path(args.output) if args.output else Path("artifacts") / f"sweep-{_model_name(model_dir)}"
    items = eval_items(args) if args.eval_n else None  # a bad --eval-dataset fails before anything is written
    if root.exists() and not root.is_dir():
        raise UsageError(f"--output {root} is a file, not a sweep directory.", "Choose another --output.")
    settings = _settings(args, model_dir)
    state = load_state(root, settings, args.force)
    todo = [v for v in variants if args.force or not _done(state, v)]
    if todo:  # methods that do not apply fail before anything is written
        check_variants(args, model_dir, todo, step)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the sweep directory {root} ({e.strerror}).", "Choose another --output.") from e
    placement.remove_dead_pid_files(root, f".{STATE}.tmp-")  # a killed sweep's half-written state file
    save_state(root, state)
    notify = on_variant or (lambda *_: None)
    ref, built = None, {}
    for i, v in enumerate(variants):
        if not args.force and _done(state, v):
            notify(i, len(variants), v.name, "skipped")
            continue
        notify(i, len(variants), v.name, "start")
        if ref is None:  # the uncompressed artifact's tokens and logits on the fidelity set
            with step(f"{variants[0].name}: build"):
                base = built[variants[0].name] = build_variant(args, model_dir, variants[0], root, step)
            pairs = fidelity.load_pairs(list(args.images), list(args.prompts))
            with step("reference tokens and logits (uncompressed)"):
                ref = fidelity.reference(VLM(base[0], backend=get_backend(threads=args.threads)), pairs,
                                         args.fidelity_tokens)
        state["variants"][v.name] = run_variant(args, model_dir, v, root, ref, step, built.get(v.name), items)
        save_state(root, state)
        notify(i, len(variants), v.name, "done")
    return SweepResult([state["variants"][v.name] for v in variants], root, settings)


def _model_name(model_dir: Path) -> str:
    from vtc.export.demo import is_demo

    return "demo-llava" if is_demo(model_dir) else model_dir.resolve().name


# -- outputs ------------------------------------------------------------------------------------------
def write_outputs(result: SweepResult) -> list[Path]:
    """sweep.json (rows + settings), sweep.csv (COLUMNS) and sweep.png in the sweep directory."""
    import csv
    import io

    from vtc.runtime import charts

    root = result.root
    (root / "sweep.json").write_text(json.dumps({"schema": "vtc.sweep", "settings": result.settings,
                                                 "rows": result.rows}, indent=2) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in result.rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    (root / "sweep.csv").write_text(buf.getvalue())
    charts.sweep_chart(_chart_rows(result.rows), root / "sweep.png",
                       f"{root.name}: TTFT and fidelity against kept visual tokens ({result.settings['model']})")
    paths = [root / "sweep.csv", root / "sweep.json", root / "sweep.png"]
    table = accuracy_table(_state_rows(root), result.settings)
    if table:
        (root / "accuracy.md").write_text(table)
        paths.append(root / "accuracy.md")
    return paths


def _chart_rows(rows: list[dict]) -> list[dict]:
    """The chart draws one line per method and KV dtype: quantized weights join the KV label, so each weights
    variant is its own line ("fastv (KV fp32, weights int8)") and the fp lines are unchanged."""
    return [{**r, "kv_cache": f"{r['kv_cache']}, weights {weights_label(r['weights'], r.get('group_size'))}"}
            if r.get("weights", "fp") != "fp" else r for r in rows]


def _state_rows(root: Path) -> list[dict]:
    try:
        return list(json.loads((root / STATE).read_text())["variants"].values())
    except (OSError, ValueError, KeyError):
        return []


def accuracy_table(rows: list[dict], settings: dict) -> str:
    """Markdown: accuracy per question type of every scored variant in the sweep directory (earlier runs
    with other --methods/--ratios/--kv-cache/--weights included): by weights (fp first), then the uncompressed
    model first, then by KV dtype, method and falling ratio. Latency stays in sweep.csv/json (this table is about
    accuracy). Rows from before --weights are fp."""
    rows = [r for r in rows if r.get("accuracy") is not None]
    if not rows:
        return ""
    types = sorted({k[4:] for r in rows for k in r if k.startswith("acc_")})
    kv_order, w_order = ["fp32", "fp16", "int8", "fp8"], list(WEIGHTS)
    rows.sort(key=lambda r: (w_order.index(r.get("weights", "fp")), r.get("group_size") or 0,
                             r["method"] != UNCOMPRESSED, kv_order.index(r["kv_cache"]) if r["kv_cache"] in kv_order else 9,
                             r["method"], -r["ratio"]))
    src = "synthetic" if settings.get("eval_dataset") == "synthetic" else settings.get("eval_dataset")
    lines = [f"Accuracy % on {rows[0]['eval_examples']} questions ({src}, seed {settings.get('eval_seed')}), greedy, "
             f"ONNX Runtime; model {Path(settings['model']).name}.", "",
             "| method | ratio | KV | weights | visual tokens | overall | " + " | ".join(types) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(types)]
    for r in rows:
        weights = weights_label(r.get("weights", "fp"), r.get("group_size"))
        cells = [r["method"], f"{r['ratio']:g}", r["kv_cache"], weights, f"{r['k_visual']} / {r['n_visual']}",
                 f"**{100 * r['accuracy']:.1f}**"]
        cells += ["-" if r.get(f"acc_{t}") is None else f"{100 * r[f'acc_{t}']:.1f}" for t in types]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
