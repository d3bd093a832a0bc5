"""`vtc-export eval`: accuracy of an artifact on a visual-QA set, per question type, with latency.

Dataset: JSONL, one {"image": path (relative to the file), "question": str, "answer": str | [str, ...],
"type": str (optional)} per line, or the built-in synthetic task (vtc.runtime.synthetic_vqa).
Scoring: the greedy answer and the reference are normalised (lower case, punctuation and articles
dropped, digits spelled as words); one reference: exact match; several (VQA style): min(1, matches/3).
Bad lines (malformed JSON, missing image, empty question or answer) are reported with their line
numbers and counted; --on-error skip (default) continues, stop ends the run with an error.
"""

from __future__ import annotations

import json
import statistics
import string
from dataclasses import dataclass, field
from pathlib import Path

from vtc.runtime.errors import InputError

DIGITS = {str(i): w for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                           "nine", "ten"))}
ARTICLES = {"a", "an", "the"}


@dataclass
class Item:
    image: object  # path or PIL image
    question: str
    answers: list
    type: str
    line: int


@dataclass
class Problems:
    lines: list = field(default_factory=list)  # (line, message)

    def add(self, line: int, message: str, on_error: str) -> None:
        if on_error == "stop":
            raise InputError(f"dataset line {line}: {message}.", "Fix the line, or pass --on-error skip to continue past it.")
        self.lines.append((line, message))


def normalize(text: str) -> str:
    words = text.lower().translate(str.maketrans("", "", string.punctuation)).split()
    return " ".join(DIGITS.get(w, w) for w in words if w not in ARTICLES)


def score(prediction: str, answers: list) -> float:
    pred = normalize(prediction)
    hits = sum(pred == normalize(a) for a in answers)
    return float(hits >= 1) if len(answers) == 1 else min(1.0, hits / 3.0)


def _item(raw: str, n: int, root: Path) -> Item:
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e.msg})") from e
    except RecursionError as e:
        raise ValueError("malformed JSON (nested too deeply)") from e
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    answers = d.get("answer")
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError("empty or missing answer")
    if not isinstance(d.get("question"), str) or not d["question"].strip():
        raise ValueError("empty or missing question")
    if not isinstance(d.get("image"), str):
        raise ValueError("missing image path")
    image = (root / d["image"]) if not Path(d["image"]).is_absolute() else Path(d["image"])
    if not image.is_file():
        raise ValueError(f"image {image} is a directory, not an image file" if image.is_dir() else
                         f"image {image} does not exist")
    return Item(image, d["question"], answers, str(d.get("type", "all")), n)


def load_jsonl(path: Path, on_error: str, limit: int | None) -> tuple[list, Problems]:
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "is not a regular file" if path.exists() else \
            "does not exist"
        raise InputError(f"dataset {path} {what}.", "Pass a JSONL file, or `synthetic` for the built-in task.")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read dataset {path} ({e.strerror or e}).", "Check its permissions.") from e
    items, problems = [], Problems()
    for n, raw_bytes in enumerate(data.splitlines(), 1):
        try:
            raw = raw_bytes.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM may open the file
        except UnicodeDecodeError as e:
            problems.add(n, f"not UTF-8 text (byte 0x{raw_bytes[e.start]:02x} at column {e.start + 1})", on_error)
            continue
        if not raw.strip():
            continue
        try:
            items.append(_item(raw, n, path.parent))
        except ValueError as e:
            problems.add(n, str(e), on_error)
        if limit and len(items) >= limit:
            break
    return items, problems


def synthetic(seed: int, limit: int) -> list:
    from vtc.runtime.synthetic_vqa import examples

    return [Item(e.image, e.question, [e.answer], e.type, i + 1) for i, e in enumerate(examples(seed, limit))]


def evaluate(vlm, items: list, problems: Problems, on_error: str, max_new_tokens: int = 8, progress=None) -> dict:
    """Run every item through the artifact (greedy) and aggregate accuracy and latency."""
    per_type, ttft, results = {}, [], []
    for k, item in enumerate(items):
        try:
            res = vlm.generate(item.image, item.question, max_new_tokens=max_new_tokens)
        except InputError as e:  # e.g. a corrupt image or a prompt over the text budget
            problems.add(item.line, " ".join(str(e).split()), on_error)
            continue
        s = score(res.text, item.answers)
        per_type.setdefault(item.type, []).append(s)
        ttft.append(res.timings_ms["ttft"])
        results.append({"line": item.line, "type": item.type, "question": item.question, "answer": item.answers,
                        "prediction": res.text, "score": s})
        if progress:
            progress(k + 1)
    scores = [r["score"] for r in results]
    return {"examples": len(results), "accuracy": statistics.mean(scores) if scores else None,
            "per_type": {t: {"n": len(v), "accuracy": statistics.mean(v)} for t, v in sorted(per_type.items())},
            "ttft_ms_p50": statistics.median(ttft) if ttft else None,
            "problems": [{"line": n, "message": m} for n, m in problems.lines], "skipped": len(problems.lines),
            "results": results}
