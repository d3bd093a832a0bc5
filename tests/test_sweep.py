"""`vtc-export sweep` on a tiny model: two methods x three ratios, the table and chart, fidelity against
the uncompressed artifact, shared LLM graphs, and resuming after an interruption without rebuilding."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from vtc.export import sweep as sw
from vtc.export.cli import main
from vtc.runtime import manifest as mf
from vtc.runtime import synthetic_vqa as sv

SETTINGS = ["--runs", "2", "--warmup", "1", "--max-new-tokens", "4", "--fidelity-tokens", "12", "--max-seq-len", "256",
            "--text-budget", "48"]


def sweep_args(model: Path, out: Path, **kw) -> sw.SweepArgs:
    base = dict(model=str(model), methods=("pool", "cls-attn"), ratios=(1.0, 0.5, 0.25), output=str(out), runs=2,
                warmup=1, max_new_tokens=4, fidelity_tokens=12, max_seq_len=256, text_budget=48)
    return sw.SweepArgs(**{**base, **kw})


class Interrupt(KeyboardInterrupt):
    pass


def test_sweep_interrupt_resume_table_and_chart(tmp_path, tiny_checkpoints, build_spy, capsys):
    model, out = tiny_checkpoints["mha-default"], tmp_path / "sweep"
    args = sweep_args(model, out)
    assert [v.name for v in sw.plan_variants(args)] == ["none-r1", "pool-r0.5", "pool-r0.25", "cls-attn-r0.5",
                                                        "cls-attn-r0.25"]
    done = []

    def interrupt_after_two(i, n, name, status):
        if status == "done":
            done.append(name)
            if len(done) == 2:
                raise Interrupt()  # as if Ctrl-C arrived right after the second variant finished

    with pytest.raises(Interrupt):
        sw.sweep(args, on_variant=interrupt_after_two)
    state = json.loads((out / sw.STATE).read_text())
    assert list(state["variants"]) == ["none-r1", "pool-r0.5"] and build_spy == ["none-r1", "pool-r0.5"]
    before = {n: (out / "artifacts" / n / "manifest.json").stat() for n in done}

    statuses = []
    result = sw.sweep(args, on_variant=lambda i, n, name, status: statuses.append((name, status)))
    assert ("none-r1", "skipped") in statuses and ("pool-r0.5", "skipped") in statuses
    assert build_spy == ["none-r1", "pool-r0.5", "pool-r0.25", "cls-attn-r0.5", "cls-attn-r0.25"]  # none rebuilt
    for n, st in before.items():
        now = (out / "artifacts" / n / "manifest.json").stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f"{n} was rebuilt"

    rows = {r["variant"]: r for r in result.rows}
    assert rows["none-r1"]["k_visual"] == 64 and rows["none-r1"]["greedy_agreement"] == 1.0
    assert rows["none-r1"]["first_token_kl"] == pytest.approx(0.0, abs=1e-9)
    assert rows["pool-r0.25"]["k_visual"] == 16 and rows["cls-attn-r0.5"]["k_visual"] == 32
    for r in result.rows:
        assert 0.0 <= r["greedy_agreement"] <= 1.0 and r["first_token_kl"] >= 0.0 and r["ttft_ms_p50"] > 0
        assert r["fidelity_pairs"] == 6 and r["fidelity_tokens"] == 12

    # the LLM graph was exported once and linked into every variant; checksums still hold
    inodes = {(out / "artifacts" / n / "llm.onnx.data").stat().st_ino for n in rows}
    assert len(inodes) == 1
    for n in rows:
        mf.load(out / "artifacts" / n, check_files=True)

    paths = sw.write_outputs(result)
    assert [p.name for p in paths] == ["sweep.csv", "sweep.json", "sweep.png"]
    table = list(csv.DictReader((out / "sweep.csv").open()))
    assert [t["variant"] for t in table] == list(rows) and set(sw.COLUMNS) == set(table[0])
    assert json.loads((out / "sweep.json").read_text())["rows"][0]["variant"] == "none-r1"
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    # a variant whose result was lost (state entry deleted) is re-measured from its artifact, not rebuilt
    state = json.loads((out / sw.STATE).read_text())
    del state["variants"]["cls-attn-r0.25"]
    (out / sw.STATE).write_text(json.dumps(state))
    n_builds = len(build_spy)
    capsys.readouterr()
    rc = main(["sweep", "--model", str(model), "--methods", "pool,cls-attn", "--ratios", "1.0,0.5,0.25",
               "--output", str(out), *SETTINGS])
    cli_out, cli_err = capsys.readouterr()
    assert rc == 0, cli_err
    assert len(build_spy) == n_builds  # nothing rebuilt
    assert cli_err.count("finished earlier, skipped") == 4 and "cls-attn-r0.25" in cli_out
    again = {r["variant"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert again["cls-attn-r0.25"]["build_s"] == 0.0

    rc = main(["sweep", "--model", str(model), "--methods", "pool", "--ratios", "1.0,0.5", "--output", str(out),
               *SETTINGS[:-2], "--text-budget", "40"])
    assert rc == 2 and "other settings (text_budget 48 -> 40)" in capsys.readouterr().err


def test_sweep_rejects_bad_grid(capsys, tmp_path):
    assert main(["sweep", "--methods", "pool,nope", "--ratios", "0.5", "--output", str(tmp_path / "s")]) == 2
    assert "unknown compression method 'nope'" in capsys.readouterr().err
    assert main(["sweep", "--methods", "pool", "--ratios", "0.5,1.5", "--output", str(tmp_path / "s")]) == 2
    assert "--ratios has 1.5" in capsys.readouterr().err
    assert main(["sweep", "--methods", "pool", "--ratios", "half", "--output", str(tmp_path / "s")]) == 2
    assert not (tmp_path / "s").exists()


def test_sweep_plan_with_kv_caches(tmp_path):
    args = sweep_args(Path("m"), tmp_path, methods=("pool",), ratios=(1.0, 0.25), kv_caches=("fp32", "int8"))
    assert [v.name for v in sw.plan_variants(args)] == ["none-r1", "pool-r0.25", "none-r1-kvint8", "pool-r0.25-kvint8"]
    with pytest.raises(sw.UsageError, match="not a KV cache type"):
        sw.plan_variants(sweep_args(Path("m"), tmp_path, kv_caches=("int4",)))


def test_sweep_accuracy_columns_and_table(tmp_path, tiny_checkpoints, capsys):
    """--eval N scores every variant on the synthetic task; accuracy.md covers every scored variant in the
    directory (a second sweep with other methods/KV dtypes adds rows); bad --eval values fail first."""
    model, out = tiny_checkpoints["mha-default"], tmp_path / "sweep"
    first = sw.sweep(sweep_args(model, out, methods=("pool",), ratios=(1.0, 0.25), eval_n=6))
    for r in first.rows:
        assert r["eval_examples"] == 6 and 0.0 <= r["accuracy"] <= 1.0
        assert {k for k in r if k.startswith("acc_")} == {f"acc_{t}" for t in sv.TYPES}  # 6 questions: one per type
    second = sw.sweep(sweep_args(model, out, methods=("cls-attn",), ratios=(1.0, 0.5), eval_n=6))
    assert [r["variant"] for r in second.rows] == ["none-r1", "cls-attn-r0.5"]
    sw.write_outputs(second)
    table = (out / "accuracy.md").read_text().splitlines()
    assert table[0].startswith("Accuracy % on 6 questions (synthetic, seed 1)")
    body = [line for line in table if line.startswith("| ") and not line.startswith("| method")]
    assert [line.split(" | ")[:2] for line in body] == [["| none", "1"], ["| cls-attn", "0.5"], ["| pool", "0.25"]]
    # the same --eval is part of the sweep's settings: changing it needs --force
    with pytest.raises(sw.UsageError, match="eval_n 6 -> 12"):
        sw.sweep(sweep_args(model, out, methods=("pool",), ratios=(0.25,), eval_n=12))

    assert main(["sweep", "--methods", "pool", "--eval", "-1", "--output", str(tmp_path / "s")]) == 2
    assert "--eval -1" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_sweep_methods_all_expands_to_every_compression_method(tmp_path):
    from vtc.export import methods
    from vtc.export.cli import _parser
    from vtc.export.commands.args import SweepOptionsArgs

    ns = _parser().parse_args(["sweep", "--methods", "all", "--output", str(tmp_path)])
    assert SweepOptionsArgs().parse(ns).methods == tuple(m for m in methods.names() if m != "none")


def test_sweep_bad_eval_dataset_fails_before_writing(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "--methods", "pool", "--ratios", "0.5", "--eval", "5", "--eval-dataset",
                 str(tmp_path / "missing.jsonl"), "--output", str(out)]) == 1
    assert "missing.jsonl does not exist" in capsys.readouterr().err and not out.exists()


def test_sweep_tiled_smolvlm(tmp_path, tiny_checkpoints, capsys):
    """--image-splits reaches every variant (build's semantics): one tiled point on a tiny SmolVLM. A method that
    cannot work on tiles (FastV ranks one contiguous image block) is refused, naming what applies, before anything is
    built or written; resuming at another layout needs --force."""
    from tests.helpers.images import random_image

    model, out, image = tiny_checkpoints["smolvlm-gqa"], tmp_path / "sweep", tmp_path / "img.png"
    random_image(3).save(image)
    tiled = ["--model", str(model), "--ratios", "1.0,0.25", "--image-splits", "2", "2", "--output", str(out),
             "--runs", "1", "--warmup", "0", "--max-new-tokens", "4", "--fidelity-tokens", "8", "--image", str(image),
             "--prompt", "What is in the picture?", "--max-seq-len", "256", "--text-budget", "64"]
    assert main(["sweep", "--methods", "pool,fastv", *tiled]) == 2
    err = capsys.readouterr().err
    assert "'fastv' does not apply" in err and "one contiguous block" in err and not out.exists()
    assert "pool" in err.split("apply to it:")[1] and "fastv" not in err.split("apply to it:")[1]
    with pytest.raises(sw.UsageError, match="--image-splits does not apply to llava"):  # a fixed-size architecture
        sw.sweep(sweep_args(tiny_checkpoints["mha-default"], tmp_path / "llava", image_splits=(2, 2)))
    assert not (tmp_path / "llava").exists()

    assert main(["sweep", "--methods", "pool", *tiled]) == 0, capsys.readouterr().err
    rows = {r["variant"]: r for r in json.loads((out / "sweep.json").read_text())["rows"]}
    assert [(rows[v]["n_visual"], rows[v]["k_visual"]) for v in ("none-r1", "pool-r0.25")] == [(80, 80), (80, 20)]
    assert rows["none-r1"]["greedy_agreement"] == 1.0 and 0.0 <= rows["pool-r0.25"]["greedy_agreement"] <= 1.0
    for v in rows:
        assert mf.load(out / "artifacts" / v, check_files=False).build_args["image_splits"] == [2, 2]
    with pytest.raises(sw.UsageError, match=r"image_splits \[2, 2\] -> \[0\]"):
        sw.sweep(sweep_args(model, out, methods=("pool",), ratios=(0.25,), image_splits=(0,)))
