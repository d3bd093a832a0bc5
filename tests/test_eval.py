"""`vtc-export eval` and the synthetic visual-QA task (the trained demo model itself: test_demo_model.py)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest

from vtc.export.cli import main
from vtc.runtime import evaluate as ev
from vtc.runtime import synthetic_vqa as sv
from vtc.runtime.errors import InputError


def test_synthetic_is_deterministic_and_consistent():
    a, b = sv.examples(3, 24), sv.examples(3, 24)
    assert [(x.question, x.answer, x.type) for x in a] == [(x.question, x.answer, x.type) for x in b]
    assert a[0].image.tobytes() == b[0].image.tobytes()
    assert {x.type for x in a} == set(sv.TYPES)
    rng = random.Random(7)
    for _ in range(200):  # answers follow from the scene
        objs = sv.scene(rng)
        assert sv.question(objs, "count", rng)[1] == sv.NUMBERS[len(objs)]
        q, ans = sv.question(objs, "colour", rng)
        assert ans == next(o.color for o in objs if f"the {o.shape}?" in q)


def test_question_refs_name_the_objects_the_answer_depends_on():
    """question_refs (the training script's binding targets) agrees with the question text and the answer,
    and consumes the generator exactly like question (so the held-out sets do not change)."""
    rng = random.Random(11)
    for _ in range(300):
        objs = sv.scene(rng)
        for kind in sv.TYPES:
            state = rng.getstate()
            q, a, refs = sv.question_refs(objs, kind, rng)
            after = rng.getstate()
            rng.setstate(state)
            assert sv.question(objs, kind, rng) == (q, a) and rng.getstate() == after
            if kind in ("colour", "position"):
                assert len(refs) == 1 and f"the {refs[0].shape}?" in q
                assert a == (refs[0].color if kind == "colour" else sv._where(refs[0]))
            elif kind == "shape":
                assert f"the {refs[0].color} object" in q and a == refs[0].shape
            elif kind == "presence":
                assert (a == "yes") == bool(refs) and all(f"{o.color} {o.shape}" in q for o in refs)
            elif kind == "count":
                assert refs == tuple(objs)
            else:
                first, second = refs
                assert q.index(first.shape) < q.index(second.shape)


@pytest.mark.parametrize("pred, answers, expected", [
    ("The Red.", ["red"], 1.0), ("3", ["three"], 1.0), ("red circle", ["red"], 0.0),
    ("yes", ["yes", "yes", "no", "yes"], 1.0), ("no", ["yes", "no", "no", "yes"], 2 / 3)])
def test_score(pred, answers, expected):
    assert ev.score(pred, answers) == pytest.approx(expected)


class Oracle:
    """A scripted 'model' that answers from a lookup: checks the evaluation math without training."""

    def __init__(self, answers: dict, wrong_types: set = frozenset()):
        self.answers, self.wrong = answers, wrong_types

    def generate(self, image, question, max_new_tokens=8):
        kind, ans = self.answers[id(image)]  # questions repeat across scenes; images do not
        return SimpleNamespace(text="banana" if kind in self.wrong else f"The {ans}.", timings_ms={"ttft": 1.0})


def test_evaluate_per_type_accuracy():
    items = ev.synthetic(5, 60)
    oracle = Oracle({id(i.image): (i.type, i.answers[0]) for i in items}, wrong_types={"count"})
    report = ev.evaluate(oracle, items, ev.Problems(), "skip")
    assert report["examples"] == 60 and report["per_type"]["count"]["accuracy"] == 0.0
    assert all(r["accuracy"] == 1.0 for t, r in report["per_type"].items() if t != "count")
    assert report["accuracy"] == pytest.approx(50 / 60)


def _dataset(tmp_path, bad: bool):
    path = sv.write_jsonl(tmp_path / "ds", seed=2, n=6)
    if bad:
        with path.open("a") as f:
            f.write("{not json\n")
            f.write(json.dumps({"image": "images/missing.png", "question": "q?", "answer": "red"}) + "\n")
            f.write(json.dumps({"image": "images/2-00000.png", "question": "q?", "answer": ""}) + "\n")
    return path


def test_bad_lines_reported_with_line_numbers(tmp_path):
    items, problems = ev.load_jsonl(_dataset(tmp_path, bad=True), "skip", None)
    assert len(items) == 6
    assert [n for n, _ in problems.lines] == [7, 8, 9]
    messages = [m for _, m in problems.lines]
    assert messages[0].startswith("malformed JSON") and "missing.png does not exist" in messages[1]
    assert messages[2] == "empty or missing answer"
    with pytest.raises(InputError, match="line 7"):
        ev.load_jsonl(tmp_path / "ds" / "data.jsonl", "stop", None)


def test_eval_cli(tmp_path, artifact_factory, capsys):
    art = artifact_factory("mha-default", "pool", 0.25)
    path = _dataset(tmp_path, bad=True)
    assert main(["eval", str(art), "--dataset", str(path), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["examples"] == 6 and report["skipped"] == 3
    assert [p["line"] for p in report["problems"]] == [7, 8, 9]
    assert "skipped line 7" in capsys.readouterr().err
    assert main(["eval", str(art), "--dataset", str(path), "--on-error", "stop"]) != 0
    err = capsys.readouterr().err
    assert "error: dataset line 7" in err and err.count("\n") == 1
    assert main(["eval", str(art), "--dataset", "synthetic", "--limit", "6"]) == 0
