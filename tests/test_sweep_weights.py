"""`vtc-export sweep --weights` (issue 14): quantized LLM weights as a sweep dimension. Planning (names, suffixes,
validation before anything is written), the build arguments each variant gets, reuse of artifacts whose manifests
predate the flag, the `weights` column of the tables, and one sweep of the demo model with int8 weights scored on
the synthetic task."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.helpers.builds import nullstep
from vtc.export import build as build_mod
from vtc.export import sweep as sw
from vtc.export.cli import main
from vtc.runtime import manifest as mf


def sweep_args(model: Path, out: Path, **kw) -> sw.SweepArgs:
    base = dict(model=str(model), methods=("pool", "cls-attn"), ratios=(1.0, 0.5, 0.25), output=str(out), runs=1,
                warmup=0, max_new_tokens=4, fidelity_tokens=8, max_seq_len=256, text_budget=48)
    return sw.SweepArgs(**{**base, **kw})


def names(**kw) -> list[str]:
    return [v.name for v in sw.plan_variants(sweep_args(Path("m"), Path("out"), **kw))]


def test_plan_names_every_weights_x_kv_x_method_ratio():
    assert names(methods=("fastv",), ratios=(1.0, 0.25)) == ["none-r1", "fastv-r0.25"]  # default fp: names as before
    assert names(methods=("fastv",), ratios=(1.0, 0.25), kv_caches=("fp32", "int8"),
                 weights=("int8", "int4-awq")) == [
        "none-r1",  # the reference: fp32 KV, fp weights, even when --weights has no fp
        "none-r1-wint8", "fastv-r0.25-wint8", "none-r1-kvint8-wint8", "fastv-r0.25-kvint8-wint8",
        "none-r1-wint4-awq", "fastv-r0.25-wint4-awq", "none-r1-kvint8-wint4-awq", "fastv-r0.25-kvint8-wint4-awq"]
    # a group other than the build's default (128) is part of an int4 name, never of an int8 one
    assert names(methods=("pool",), ratios=(0.5,), weights=("fp", "int8", "int4"), group_size=64) == [
        "none-r1", "pool-r0.5", "pool-r0.5-wint8", "pool-r0.5-wint4-g64"]
    v = sw.plan_variants(sweep_args(Path("m"), Path("o"), methods=("pool",), ratios=(0.5,), weights=("int4",)))[-1]
    assert (v.name, v.weights, v.group_size) == ("pool-r0.5-wint4", "int4", 128)


@pytest.mark.parametrize("weights,group,message", [
    (("int8", "int2"), 128, r"--weights int2: not a weights variant.*fp, int8, int4, int4-awq"),
    ((), 128, r"--weights \(empty\)"),
    (("awq",), 128, "not a weights variant"),
    (("int4-awq",), 48, "--group-size 48 is not a power of two"),
])
def test_plan_refuses_bad_weights(weights, group, message):
    with pytest.raises(sw.UsageError, match=message):
        names(weights=weights, group_size=group)


def test_group_size_matters_only_to_int4():
    assert names(methods=("pool",), ratios=(0.5,), weights=("int8",), group_size=48)[-1] == "pool-r0.5-wint8"


def test_cli_bad_weights_exit_2_before_writing(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "--methods", "pool", "--ratios", "0.5", "--weights", "fp,int3", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--weights int3: not a weights variant" in err and "int4-awq" in err and not out.exists()
    assert main(["sweep", "--methods", "pool", "--ratios", "0.5", "--weights", "int4", "--group-size", "100",
                 "--output", str(out)]) == 2
    assert "--group-size 100" in capsys.readouterr().err and not out.exists()


def test_build_args_carry_weights_algo_and_group():
    args = sweep_args(Path("m"), Path("o"), methods=("fastv",), ratios=(0.25,), kv_caches=("int8",),
                      weights=("fp", "int8", "int4", "int4-awq"), group_size=64)
    got = {v.name: sw._build_args(args, Path("m"), v, Path("o") / v.name) for v in sw.plan_variants(args)}
    pick = {n: (b.weights, b.weights_algo, b.group_size, b.kv_cache, b.method) for n, b in got.items()}
    assert pick == {"none-r1": ("fp", "rtn", 128, "fp32", "none"),
                    "fastv-r0.25-kvint8": ("fp", "rtn", 128, "int8", "fastv"),
                    "fastv-r0.25-kvint8-wint8": ("int8", "rtn", 128, "int8", "fastv"),
                    "fastv-r0.25-kvint8-wint4-g64": ("int4", "rtn", 64, "int8", "fastv"),
                    "fastv-r0.25-kvint8-wint4-awq-g64": ("int4", "awq", 64, "int8", "fastv")}
    for b in got.values():
        build_mod._check_args(b)  # what the build accepts


def test_existing_artifact_from_before_the_flag_is_reused_as_fp(tmp_path, tiny_checkpoints):
    """A manifest without the weights keys (built before --weights) is the fp, rtn, group-128 build it was."""
    model = tiny_checkpoints["mha-default"]
    args = sweep_args(model, tmp_path, weights=("fp", "int8", "int4"))
    fp, int8, int4 = (sw.Variant("none", 1.0, "fp32", w, 128 if w == "int4" else None) for w in ("fp", "int8", "int4"))
    out = tmp_path / "art"
    build_mod.build(sw._build_args(args, model, fp, out), nullstep)
    assert sw._existing(out, sw._build_args(args, model, fp, out))
    m = json.loads((out / "manifest.json").read_text())
    assert {k: m["build_args"][k] for k in ("weights", "group_size", "weights_algo")} == {
        "weights": "fp", "group_size": 128, "weights_algo": "rtn"}
    for k in ("weights", "group_size", "weights_algo"):
        del m["build_args"][k]
    (out / "manifest.json").write_text(json.dumps(m))
    assert sw._existing(out, sw._build_args(args, model, fp, out))
    assert not sw._existing(out, sw._build_args(args, model, int8, out))
    assert not sw._existing(out, sw._build_args(args, model, int4, out))
    m["build_args"].update(weights="int4", group_size=64, weights_algo="rtn")  # a group other than asked: rebuild
    (out / "manifest.json").write_text(json.dumps(m))
    assert not sw._existing(out, sw._build_args(args, model, int4, out))


def _row(method, ratio, kv="fp32", weights=None, group=None, acc=0.5, k=64):
    r = {"variant": f"{method}-{ratio}-{kv}-{weights}", "method": method, "ratio": ratio, "kv_cache": kv, "k_visual": k,
         "n_visual": 256, "accuracy": acc, "eval_examples": 500, "acc_colour": acc}
    if weights is not None:  # rows of sweeps from before --weights have no weights key
        r.update(weights=weights, group_size=group)
    return r


def test_accuracy_table_weights_column_and_order():
    rows = [_row("fastv", 0.25, "int8", "int4-awq", 64, 0.75), _row("pool", 0.25, acc=0.572),
            _row("fastv", 0.25, "fp32", "int8", None, 0.77), _row("none", 1.0, "int8", "int8", None, 0.99, 256),
            _row("none", 1.0, acc=0.99, k=256), _row("none", 1.0, "int8", acc=0.99, k=256),
            _row("none", 1.0, "fp32", "int4", 64, 0.98, 256), _row("fastv", 0.25, "fp32", "fp", None, 0.778)]
    table = sw.accuracy_table(rows, {"model": "/x/demo-model", "eval_dataset": "synthetic", "eval_seed": 1})
    lines = table.splitlines()
    assert lines[2] == "| method | ratio | KV | weights | visual tokens | overall | colour |"
    body = [line.split(" | ")[:4] for line in lines[4:]]
    assert body == [["| none", "1", "fp32", "fp"], ["| none", "1", "int8", "fp"], ["| fastv", "0.25", "fp32", "fp"],
                    ["| pool", "0.25", "fp32", "fp"],  # fp rows (old ones included) keep their order, then per weights:
                    ["| none", "1", "int8", "int8"], ["| fastv", "0.25", "fp32", "int8"],
                    ["| none", "1", "fp32", "int4 g64"], ["| fastv", "0.25", "int8", "int4-awq g64"]]
    assert lines[-1] == "| fastv | 0.25 | int8 | int4-awq g64 | 64 / 256 | **75.0** | 75.0 |"
    chart = {r["variant"]: r["kv_cache"] for r in sw._chart_rows(rows)}  # one chart line per method x KV x weights
    assert chart["fastv-0.25-int8-int4-awq"] == "int8, weights int4-awq g64" and chart["pool-0.25-fp32-None"] == "fp32"


def test_demo_int4_group_that_does_not_divide_is_refused_first(tmp_path):
    """The demo's layers are 192 and 512 wide: int4 blocks of the default 128 do not fit; the sweep says which
    --group-size does before it builds or writes anything."""
    out = tmp_path / "s"
    with pytest.raises(sw.UsageError, match=r"--group-size 128 does not divide the input dim 192.*--group-size 64"):
        sw.sweep(sw.SweepArgs(model=None, methods=("fastv",), ratios=(1.0, 0.25), output=str(out),
                              weights=("int4-awq",)))
    assert not out.exists()


@pytest.mark.slow  # two demo builds, the int8 one with its accuracy check: ~2.5 CPU-minutes
def test_demo_sweep_with_int8_weights(tmp_path, build_spy, capsys):
    """The demo model uncompressed with fp and int8 weights: each artifact holds what its name says, both are scored
    on the same synthetic questions, and the CSV, printed table and accuracy.md carry the weights column; rerunning
    without the state file's rows reuses the built artifacts (their manifests match the asked weights)."""
    out = tmp_path / "sweep"
    argv = ["sweep", "--methods", "fastv", "--ratios", "1.0", "--weights", "fp,int8", "--eval", "12", "--runs", "1",
            "--warmup", "0", "--max-new-tokens", "4", "--fidelity-tokens", "8", "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert build_spy == ["none-r1", "none-r1-wint8"]
    printed = capsys.readouterr().out
    assert "weights" in printed and "int8" in printed
    m = mf.load(out / "artifacts" / "none-r1-wint8", check_files=True)
    assert m.weights.dtype == "int8" and m.parity["ok"] and m.build_args["weights"] == "int8"
    assert mf.load(out / "artifacts" / "none-r1", check_files=False).weights is None
    rows = {r["variant"]: r for r in csv.DictReader((out / "sweep.csv").open())}
    assert [(r["kv_cache"], r["weights"]) for r in rows.values()] == [("fp32", "fp"), ("fp32", "int8")]
    for r in rows.values():
        assert r["eval_examples"] == "12" and 0.5 <= float(r["accuracy"]) <= 1.0  # the trained model: chance is ~1/3
    assert float(rows["none-r1-wint8"]["greedy_agreement"]) >= 0.5
    table = (out / "accuracy.md").read_text().splitlines()
    assert [line.split(" | ")[3] for line in table[4:]] == ["fp", "int8"]

    state = json.loads((out / sw.STATE).read_text())
    state["variants"] = {}  # results lost, artifacts kept: re-measured, not rebuilt
    (out / sw.STATE).write_text(json.dumps(state))
    assert main(argv) == 0, capsys.readouterr().err
    assert build_spy == ["none-r1", "none-r1-wint8"]
    again = json.loads((out / "sweep.json").read_text())["rows"]
    assert [(r["variant"], r["build_s"]) for r in again] == [("none-r1", 0.0), ("none-r1-wint8", 0.0)]
