"""A deterministic synthetic visual-QA task: coloured shapes on a grid, questions that need the image.

Each scene places 2-4 shapes in distinct cells of a 4 x 4 grid (336 px). Question types stress
different visual information:
  colour    "what color is the circle?"            -> "red"
  shape     "what shape is the blue object?"       -> "square"
  presence  "is there a green triangle?"           -> "yes" / "no"
  position  "where is the star?"                   -> "top left" | "top right" | "bottom left" | "bottom right"
  count     "how many shapes are there?"           -> "three"
  relation  "is the circle left of the square?"    -> "yes" / "no"
Colours and shapes are unique within a scene, so every question has one answer. `examples(seed, n)`
is deterministic; `write_jsonl` saves images + a JSONL file in the format `vtc-export eval` reads.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

SIZE, GRID = 336, 4
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle", "star")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
TYPES = ("colour", "shape", "presence", "position", "count", "relation")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    row: int
    col: int


@dataclass(frozen=True)
class Example:
    image: Image.Image
    question: str
    answer: str
    type: str


def render(objs: list[Obj]) -> Image.Image:
    img = Image.new("RGB", (SIZE, SIZE), (235, 235, 235))
    d, cell = ImageDraw.Draw(img), SIZE // GRID
    for o in objs:
        x0, y0 = o.col * cell + 12, o.row * cell + 12
        x1, y1, fill = x0 + cell - 24, y0 + cell - 24, COLORS[o.color]
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        if o.shape == "circle":
            d.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            d.rectangle((x0, y0, x1, y1), fill=fill)
        elif o.shape == "triangle":
            d.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=fill)
        else:  # a five-pointed star, point up
            rad = [r if i % 2 == 0 else r / 2.5 for i in range(10)]
            ang = [-math.pi / 2 + i * math.pi / 5 for i in range(10)]
            d.polygon([(cx + q * math.cos(a), cy + q * math.sin(a)) for q, a in zip(rad, ang)], fill=fill)
    return img


def scene(rng: random.Random) -> list[Obj]:
    n = rng.randint(2, 4)
    cells = rng.sample(range(GRID * GRID), n)
    shapes, colors = rng.sample(SHAPES, n), rng.sample(list(COLORS), n)
    return [Obj(s, c, cell // GRID, cell % GRID) for s, c, cell in zip(shapes, colors, cells)]


def _where(o: Obj) -> str:
    return f"{'top' if o.row < GRID // 2 else 'bottom'} {'left' if o.col < GRID // 2 else 'right'}"


def question(objs: list[Obj], kind: str, rng: random.Random) -> tuple[str, str]:
    """(question, answer) of type `kind` about the scene `objs`."""
    q, a, _ = question_refs(objs, kind, rng)
    return q, a


def question_refs(objs: list[Obj], kind: str, rng: random.Random) -> tuple[str, str, tuple]:
    """(question, answer, the objects it names: (first, second?) for a relation, every object for a count,
    the matching object or none for presence)."""
    o = rng.choice(objs)
    if kind == "colour":
        return f"what color is the {o.shape}?", o.color, (o,)
    if kind == "shape":
        return f"what shape is the {o.color} object?", o.shape, (o,)
    if kind == "presence":
        shape, color = (o.shape, o.color) if rng.random() < 0.5 else (rng.choice(SHAPES), rng.choice(list(COLORS)))
        match = tuple(x for x in objs if x.shape == shape and x.color == color)
        return f"is there a {color} {shape}?", "yes" if match else "no", match
    if kind == "position":
        return f"where is the {o.shape}?", _where(o), (o,)
    if kind == "count":
        return "how many shapes are there?", NUMBERS[len(objs)], tuple(objs)
    a, b = rng.sample(objs, 2)
    if a.col == b.col:
        return f"is the {a.shape} above the {b.shape}?", "yes" if a.row < b.row else "no", (a, b)
    return f"is the {a.shape} left of the {b.shape}?", "yes" if a.col < b.col else "no", (a, b)


def examples(seed: int, n: int) -> list[Example]:
    """n examples, question types in rotation, deterministic for a seed."""
    rng, out = random.Random(seed), []
    for i in range(n):
        objs = scene(rng)
        kind = TYPES[i % len(TYPES)]
        q, a = question(objs, kind, rng)
        out.append(Example(render(objs), q, a, kind))
    return out


def write_jsonl(out_dir: Path, seed: int, n: int) -> Path:
    """Images under out_dir/images and out_dir/data.jsonl ({image, question, answer, type})."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, ex in enumerate(examples(seed, n)):
        name = f"images/{seed}-{i:05d}.png"
        ex.image.save(out_dir / name)
        lines.append(json.dumps({"image": name, "question": ex.question, "answer": ex.answer, "type": ex.type}))
    path = out_dir / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
