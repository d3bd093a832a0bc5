"""Property-based fuzz of the manifest parser and the runtime loader (issue 15, acceptance 2).

Two real artifacts (uncompressed, and FastV: in-LLM, four graphs) are copied once (every file hard-linked
except manifest.json, which each example replaces). Hypothesis (derandomized: the same examples on every
run) applies one mutation per example to their manifest.json: delete a key or list item, replace a value
with a JSON value of another type, a huge or negative number, a NaN-like value, deep or wrapped nesting, a
path with `..`, an absolute path, another artifact's graph or another listed file, rename a key (also to
a sibling's name or an escaping path), add an unknown key, duplicate a list item, retype an int as float.

Properties, for every mutation:
* `load` (the default "sizes" check) either returns or raises exactly an ArtifactError: no other exception;
  a loaded manifest also prints (`inspect`) and serialises without an exception;
* no harmful acceptance: a manifest that loads is either equal to the original in every field the runtime
  reads (`runtime_view`), or the runtime refuses it with a VtcError, or generates exactly what the original
  does (tokens, kept indices, token map). Fields outside the view are informational for the runtime
  (provenance, build_args, parity, KV accuracy, method name/ratio/options, profiles the engine build and
  lint read, the files' sha256, which `verify` checks; the sizes level hashes files up to SMALL_FILE_BYTES).
A sample of mutations (VLM_EXAMPLES) also opens the runtime (`VLM`: sessions, tokenizer, cache) and, when it
opens, generates: nothing but VtcError may come out. >= 1,000 mutations run in all (checked at the end).

Same-type, in-range value changes (an EOS id 2 -> 3, mean <-> std) are not mutations here: no validation
can tell them from a real build; the artifact digest that `inspect` prints (a deployment pins it) does.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtc.runtime import manifest as mf
from vtc.runtime.errors import ArtifactError, VtcError

LOAD_EXAMPLES = 520  # per artifact: 1,040 load-level mutations
VLM_EXAMPLES = 100  # mutations that also open the runtime (50 per artifact)
STATS: dict = {"load": 0, "accepted": 0, "escalated": 0, "vlm": 0, "vlm_opened": 0}
ESCALATED: list = []  # accepted mutations that changed a runtime field, and what the runtime did
ARTIFACTS = {"none": ("mha-default", "none", None, {}), "fastv": ("mqa-layer-1", "fastv", 0.25, {"method_options": {}})}
PATH_KEYS = {"file", "chat_template", "scales"}
SETTINGS = dict(derandomize=True, database=None, deadline=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


# -- the artifacts ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Base:
    name: str
    src: Path  # the built artifact (never written)
    work: Path  # hard links of every file but the manifest
    raw: dict  # the original manifest
    text: str
    other_graph: str  # the absolute path of the other artifact's vision graph
    view: dict = None
    generated: tuple | None = None


@pytest.fixture(scope="module")
def bases(artifact_factory, tmp_path_factory) -> dict[str, Base]:
    root = tmp_path_factory.mktemp("fuzz")
    srcs = {k: artifact_factory(*a[:3], **a[3]) for k, a in ARTIFACTS.items()}
    out = {}
    for k, src in srcs.items():
        work = root / k
        work.mkdir()
        for p in src.iterdir():
            if p.name != mf.MANIFEST:
                os.link(p, work / p.name)
        text = (src / mf.MANIFEST).read_text()
        other = next(s for n, s in srcs.items() if n != k)
        out[k] = Base(k, src, work, json.loads(text), text, str(other / "vision.onnx"))
        write_manifest(work, text)
        out[k].view = runtime_view(mf.load(work))
    return out


def write_manifest(work: Path, text: str) -> None:
    """Replace manifest.json by a new file (never write through a link to the built artifact)."""
    tmp = work / ".manifest.tmp"
    tmp.write_text(text)
    os.replace(tmp, work / mf.MANIFEST)


# -- what the runtime reads ------------------------------------------------------------------------
def runtime_view(m: mf.Manifest) -> dict:
    """Every manifest field the runtime (VLM, backends, selectors) reads, in the form it uses it."""
    from vtc.runtime import selectors
    from vtc.runtime.preprocess import ImagePreprocessor

    c = m.compression
    return {
        "image_token": m.model.image_token, "image_token_id": m.model.image_token_id,
        "compression": (c.n_visual, c.k_visual, list(c.grid), c.has_cls, c.stage, c.work_layer,
                        list(c.kv_visual_per_layer), c.selector,
                        {k: c.options.get(k) for k in (selectors.get(c.selector).option_bounds if c.selector else {})}),
        "lm": dataclasses.asdict(m.lm), "text": dataclasses.asdict(m.text),
        "kv": (m.kv_cache.dtype, list(m.kv_cache.layer_dtypes), m.kv_cache.bytes_per_token, m.kv_cache.bytes_total,
               m.kv_cache.scales),
        "graphs": {n: (g.file, [dataclasses.astuple(t) for t in g.inputs], [dataclasses.astuple(t) for t in g.outputs])
                   for n, g in m.graphs.items()},
        "embeddings": m.embeddings,
        "preprocess": ImagePreprocessor.from_config(m.preprocess),
        "files": {k: v["bytes"] for k, v in m.files.items()},
        "engines": None if m.engines is None else dataclasses.asdict(m.engines),
    }


def generate(work: Path) -> tuple:
    from PIL import Image

    from vtc.runtime.pipeline import VLM

    vlm = VLM(work)
    r = vlm.generate(Image.new("RGB", (90, 70), (200, 40, 40)), "What is in the picture?", max_new_tokens=3)
    return r.token_ids, r.kept_indices, r.token_map, r.text


def original_generation(base: Base) -> tuple:
    if base.generated is None:
        write_manifest(base.work, base.text)
        base.generated = generate(base.work)
    return base.generated


# -- mutations -------------------------------------------------------------------------------------
def paths(node, prefix=()) -> list[tuple]:
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out += paths(v, prefix + (k,))
    return out


def json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", list: "array", dict: "object"}[type(v)]


JSON_VALUES = {
    "null": st.none(),
    "bool": st.booleans(),
    "number": st.one_of(st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True)),
    "string": st.one_of(st.text(max_size=12), st.sampled_from(["float32", "vision.onnx", "seq", "llm", "<image>"])),
    "array": st.lists(st.one_of(st.integers(-2, 300), st.text(max_size=4), st.none()), max_size=4),
    "object": st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-2, 300), st.none()), max_size=3),
}
HUGE = [2 ** 31, 2 ** 53 + 1, 2 ** 63, 2 ** 64 + 1, 10 ** 30, 10 ** 400, -(2 ** 63)]
NAN_LIKE = [math.nan, math.inf, -math.inf, 1e308, -1e308, "NaN", "Infinity", 5e-324]
PATH_ATTACKS = ["../x", "/etc/passwd", "../b/vision.onnx", "a/../vision.onnx", "./vision.onnx", "vision.onnx/",
                "", "vision.onnx\x00", "C:\\vision.onnx", "~/.ssh/id_rsa", "sub//vision.onnx", "\u202evision.onnx",
                "manifest.json", ".manifest.tmp", "\ud800.onnx", "llm.onnx.data", "select.onnx", "tokenizer.json"]
KINDS = ["delete", "other_type", "huge", "negative", "nan_like", "nested", "path", "rename", "add_key", "dup_item",
         "int_as_float"]


def get(raw, path):
    for k in path:
        raw = raw[k]
    return raw


def is_path_like(path: tuple, value) -> bool:
    """A key of the files table, or a value the manifest uses as a path (graph/engine file, embeddings,
    chat template, KV scales; null ones too: a path put there must be refused as well)."""
    return (len(path) == 2 and path[0] == "files") or (
        path[-1] in PATH_KEYS and isinstance(value, (str, type(None))) and path[0] in ("graphs", "embeddings", "text", "kv_cache", "engines"))


@st.composite
def mutation(draw, base: Base):
    raw = copy.deepcopy(base.raw)
    section = draw(st.sampled_from(sorted(raw)))
    candidates = [(section,)] + [(section, *p) for p in paths(raw[section])]
    kind = draw(st.sampled_from(KINDS))
    if kind == "path":  # aim path attacks at every path the manifest names, and at the files table's keys
        candidates = [p for p in paths(raw) if is_path_like(p, get(raw, p))]
    path = draw(st.sampled_from(candidates))
    parent, key = get(raw, path[:-1]), path[-1]
    old = parent[key]
    if kind == "delete":
        del parent[key]
    elif kind == "other_type":
        parent[key] = draw(JSON_VALUES[draw(st.sampled_from(sorted(set(JSON_VALUES) - {json_type(old)})))])
    elif kind == "huge":
        parent[key] = draw(st.sampled_from(HUGE))
    elif kind == "negative":
        parent[key] = -abs(old) - 1 if json_type(old) == "number" and math.isfinite(old) else draw(st.sampled_from([-1, -(2 ** 31)]))
    elif kind == "nan_like":
        parent[key] = draw(st.sampled_from(NAN_LIKE))
    elif kind == "nested":
        parent[key] = draw(st.sampled_from([[old], {"value": old}, "deep"]))
        if parent[key] == "deep":
            deep = old
            for _ in range(40):
                deep = [deep]
            parent[key] = deep
    elif kind == "path":
        attacks = PATH_ATTACKS + [base.other_graph, str(base.work.parent / "elsewhere" / "vision.onnx")]
        attacks += sorted(raw.get("files", {})) if isinstance(raw.get("files"), dict) else []
        new = draw(st.sampled_from(attacks))
        if len(path) == 2 and path[0] == "files":  # a files key
            value = parent.pop(key)
            parent[new] = value
        else:
            parent[key] = new
    elif kind == "rename":
        if isinstance(parent, dict):
            siblings = sorted(k for k in parent if k != key)
            new = draw(st.sampled_from([key + "_x", key.upper() if key.upper() != key else key + "X", ""] + siblings[:5]))
            value = parent.pop(key)
            parent[new] = value
        else:
            del parent[key]
    elif kind == "add_key":
        target = old if isinstance(old, dict) else parent if isinstance(parent, dict) else None
        if target is None:
            parent[key] = {"extra": old}
        else:
            target[draw(st.sampled_from(["extra", "file", "bytes", "../x", "dtype"]))] = draw(JSON_VALUES["number"])
    elif kind == "dup_item":
        if isinstance(old, list) and old:
            old.append(copy.deepcopy(old[draw(st.integers(0, len(old) - 1))]))
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(old))
        else:
            parent[key] = [old, old]
    elif kind == "int_as_float":
        parent[key] = float(old) if json_type(old) == "number" and abs(old) < 2 ** 53 else 1.0
    return raw, f"{kind} at {'.'.join(map(str, path))}"


def dumps(raw) -> str:
    try:
        return json.dumps(raw, indent=2)
    except (ValueError, UnicodeEncodeError):  # a lone surrogate or an int too long for str()
        return json.dumps(raw, indent=2, ensure_ascii=True)


# -- the properties --------------------------------------------------------------------------------
def check_one(base: Base, raw: dict, what: str, open_runtime: bool = False) -> None:
    from rich.console import Console

    from vtc.export.report import print_manifest

    write_manifest(base.work, dumps(raw))
    try:
        m, digest = mf.load_with_digest(base.work)
    except ArtifactError as e:
        assert "\n" not in str(e) and e.fix, f"{what}: {e!r}"
        m = None
    except Exception as e:  # noqa: BLE001 - the property under test
        pytest.fail(f"{what}: load raised {type(e).__name__}: {e}")
    if m is not None:
        STATS["accepted"] += 1
        print_manifest(Console(file=io.StringIO(), width=120), m, digest=digest)
        assert mf.parse(m.to_json()) == m, what
        if runtime_view(m) != base.view:
            STATS["escalated"] += 1
            try:
                got = generate(base.work)
            except VtcError:
                got = None  # refused by the runtime: not harmful
            ESCALATED.append(f"{base.name}: {what}: {'refused by the runtime' if got is None else 'same output'}")
            if got is not None:
                assert got == original_generation(base), f"{what}: accepted and the runtime behaves differently"
                write_manifest(base.work, dumps(raw))
    if open_runtime:
        from vtc.runtime.pipeline import VLM

        STATS["vlm"] += 1
        try:
            vlm = VLM(base.work)
        except VtcError:
            return
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"{what}: VLM raised {type(e).__name__}: {e}")
        STATS["vlm_opened"] += 1
        try:
            from PIL import Image

            vlm.generate(Image.new("RGB", (64, 48), (10, 90, 200)), "Describe it.", max_new_tokens=2)
        except VtcError:
            pass


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_manifest_mutations_load_or_fail_cleanly(bases, name):
    base = bases[name]

    @settings(max_examples=LOAD_EXAMPLES, **SETTINGS)
    @given(st.data())
    def prop(data):
        raw, what = data.draw(mutation(base))
        STATS["load"] += 1
        check_one(base, raw, what)

    try:
        prop()
    finally:
        write_manifest(base.work, base.text)


@pytest.mark.parametrize("name", list(ARTIFACTS))
def test_manifest_mutations_through_the_runtime_loader(bases, name):
    base = bases[name]

    @settings(max_examples=VLM_EXAMPLES // len(ARTIFACTS), **SETTINGS)
    @given(st.data())
    def prop(data):
        raw, what = data.draw(mutation(base))
        check_one(base, raw, what, open_runtime=True)

    try:
        prop()
    finally:
        write_manifest(base.work, base.text)


# -- raw-text cases the JSON mutations cannot reach ----------------------------------------------------
@pytest.mark.parametrize("case", ["non_utf8", "utf16", "deep_nesting", "long_int", "bom", "empty", "huge_file",
                                  "nul", "lone_surrogate"])
def test_raw_manifest_bytes(bases, case):
    base = bases["none"]
    text = base.text.encode()
    data = {"non_utf8": text.replace(b'"llava"', b'"ll\xffva"'),
            "utf16": base.text.encode("utf-16"),
            "deep_nesting": text.replace(b'"parity": {', b'"parity": {"x": ' + b"[" * 100000 + b"]" * 100000 + b', ', 1),
            "long_int": text.replace(b'"num_layers": 2', b'"num_layers": ' + b"9" * 5000, 1),
            "bom": b"\xef\xbb\xbf" + text,
            "empty": b"",
            "huge_file": text + b" " * (17 << 20),
            "nul": text.replace(b'"llava"', b'"ll\\u0000ava"'),
            "lone_surrogate": text.replace(b'"llava"', b'"ll\\ud800ava"')}[case]
    (base.work / ".manifest.tmp").write_bytes(data)
    os.replace(base.work / ".manifest.tmp", base.work / mf.MANIFEST)
    try:
        with pytest.raises(ArtifactError) as err:
            mf.load(base.work)
        assert "\n" not in str(err.value) and err.value.fix
    finally:
        write_manifest(base.work, base.text)


def test_at_least_a_thousand_mutations():
    """After the mutation tests (pytest runs a file's tests in order): the count acceptance 2 asks for."""
    if STATS["load"] == 0:
        pytest.skip("the mutation tests did not run (selected out)")
    print(f"\nmanifest fuzz: {STATS}; accepted with a changed runtime field: {ESCALATED}")
    assert STATS["load"] + STATS["vlm"] >= 1000, STATS
    assert STATS["load"] >= 1000, STATS


def test_the_copy_never_wrote_the_built_artifacts(bases):
    for base in bases.values():
        assert (base.src / mf.MANIFEST).read_text() == base.text
