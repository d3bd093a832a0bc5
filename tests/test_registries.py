"""The registries against the test matrices: every registered architecture has a tiny test config, and every
registered compression method (the built-in ones) is parity-tested on every architecture it applies to (the others
are declared in REFUSED and checked to be refused, naming what applies) and linted.

Adding an architecture (vtc.export.models) or a method (vtc.export.methods) without adding it to
tests/helpers/tiny.py and tests/helpers/matrix.py fails here, naming what is missing.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers.builds import refused_before_export
from tests.helpers.matrix import LINT_CONFIG, LINT_MATRIX, LINT_RATIO, PARITY_MATRIX, REFUSED, ParityCase
from tests.helpers.tiny import ALL_TINY, TINY_BY_MODEL_TYPE
from vtc.export import methods, models
from vtc.export.models.base import CAPABILITIES

# The registered methods as this module is imported (collection, before any test can register a toy method).
REGISTERED_AT_IMPORT = tuple(methods.names())


def builtin_methods() -> list[str]:
    """The methods vtc itself ships: registered at import, implemented in a module of vtc.export.methods."""
    return [n for n in REGISTERED_AT_IMPORT if type(methods.get(n)).__module__.startswith(methods.__name__ + ".")]


def coverage_problems(architectures, method_names, parity=PARITY_MATRIX, lint=LINT_MATRIX,
                      tiny_by_model_type=TINY_BY_MODEL_TYPE, tiny=ALL_TINY, refused=REFUSED) -> list[str]:
    """What the test matrices miss of architectures (model types) x methods; empty when fully covered.

    An architecture needs a tiny config; each (architecture, method) a PARITY_MATRIX row on one of that
    architecture's tiny configs ("none", the uncompressed model, is also covered by any ratio-1.0 row), unless
    `refused` declares that the method does not apply to it (then it must have no row: the refusal is tested
    instead); each method a LINT_MATRIX entry, whose artifact is a parity row's (no extra build for the lint)."""
    problems = []
    arch_of = {cfg: mt for mt, cfgs in tiny_by_model_type.items() for cfg in cfgs}
    for cfg in tiny:
        if cfg not in arch_of:
            problems.append(f"tiny config {cfg!r} is not listed under any model type in TINY_BY_MODEL_TYPE "
                            "(tests/helpers/tiny.py)")
    for mt, cfgs in tiny_by_model_type.items():
        for cfg in cfgs:
            if cfg not in tiny:
                problems.append(f"TINY_BY_MODEL_TYPE[{mt!r}] names {cfg!r}, which is not in TINY")
    for row in parity:
        if row.config not in tiny:
            problems.append(f"PARITY_MATRIX row {tuple(row)} uses tiny config {row.config!r}, which is not in TINY")
        if row.method not in method_names:
            problems.append(f"PARITY_MATRIX row {tuple(row)} uses method {row.method!r}, which is not registered")
    for m in lint:
        if m not in method_names:
            problems.append(f"LINT_MATRIX lists method {m!r}, which is not registered")
    for mt, names in refused.items():
        if mt not in architectures:
            problems.append(f"REFUSED names architecture {mt!r}, which is not registered")
        problems += [f"REFUSED[{mt!r}] names method {m!r}, which is not registered" for m in names
                     if m not in method_names]

    def covers(row: ParityCase, method: str) -> bool:
        return row.method == method or (method == "none" and row.ratio == 1.0)

    for mt in architectures:
        if not tiny_by_model_type.get(mt):
            problems.append(f"architecture {mt!r} has no tiny test config: add one to ALL_TINY (written by "
                            "write_tiny) and TINY_BY_MODEL_TYPE (tests/helpers/tiny.py)")
            continue
        for m in method_names:
            tested = any(arch_of.get(r.config) == mt and covers(r, m) for r in parity)
            if m in refused.get(mt, ()):
                if tested:
                    problems.append(f"method {m!r} on architecture {mt!r} has PARITY_MATRIX rows but is listed in "
                                    "REFUSED (tests/helpers/matrix.py): it cannot be both")
            elif not tested:
                problems.append(f"method {m!r} on architecture {mt!r} is missing from PARITY_MATRIX "
                                "(tests/helpers/matrix.py): no artifact-vs-PyTorch parity test")
    for m in method_names:
        if m not in lint:
            problems.append(f"method {m!r} is missing from LINT_MATRIX (tests/helpers/matrix.py): its graphs are "
                            "not linted")
        elif not any(r.config == LINT_CONFIG and covers(r, m) and (m == "none" or r.ratio == LINT_RATIO)
                     for r in parity):
            problems.append(f"method {m!r} is linted, but PARITY_MATRIX has no {LINT_CONFIG!r} row at ratio "
                            f"{LINT_RATIO} for the lint to share (tests/test_lint.py would build an extra artifact)")
    return problems


def test_every_registered_architecture_and_method_is_in_the_test_matrices():
    archs, meths = models.supported(), builtin_methods()
    assert archs and meths
    problems = coverage_problems(archs, meths)
    assert not problems, "the test matrices miss registered architectures/methods:\n  " + "\n  ".join(problems)


def test_the_checker_reports_what_is_missing():
    """The check above can fail: a fake registry with one more architecture and one more method. (On the
    architectures that have tiny configs: a registered one without any is the test above's failure.)"""
    archs = {mt: name for mt, name in models.supported().items() if mt in TINY_BY_MODEL_TYPE}
    meths = builtin_methods()
    assert set(archs) == set(TINY_BY_MODEL_TYPE) and coverage_problems(archs, meths) == []
    problems = coverage_problems({**archs, "toy_vlm": "Toy VLM"}, [*meths, "toy-method"])
    assert any("architecture 'toy_vlm' has no tiny test config" in p for p in problems), problems
    assert all(any(f"'toy-method' on architecture {mt!r}" in p and "PARITY_MATRIX" in p for p in problems)
               for mt in archs), problems
    assert any("'toy-method'" in p and "LINT_MATRIX" in p for p in problems), problems
    assert len(problems) == len(archs) + 2, problems  # nothing about the methods and architectures that are covered
    # "none" is covered by its own rows or by any ratio-1.0 row, and reported without either
    without_none = [r for r in PARITY_MATRIX if r.method != "none"]
    assert any("'none'" in p and "PARITY_MATRIX" in p for p in coverage_problems(archs, meths, parity=without_none))
    ratio_one = without_none + [ParityCase(cfg, "pool", 1.0) for cfg in ALL_TINY]
    assert not any("'none'" in p and "PARITY_MATRIX" in p for p in coverage_problems(archs, meths, parity=ratio_one))
    # a method that has been removed from the registry but not from the matrices
    assert any("'divprune', which is not registered" in p
               for p in coverage_problems(archs, [m for m in meths if m != "divprune"]))
    # REFUSED excuses exactly what it lists: undeclared, the [CLS] methods are missing on SigLIP; declared, they
    # must have no rows; a REFUSED entry for an architecture or method that is not registered is reported
    undeclared = coverage_problems(archs, meths, refused={})
    assert sorted(undeclared) == sorted(f"method {m!r} on architecture {mt!r} is missing from PARITY_MATRIX "
                                        "(tests/helpers/matrix.py): no artifact-vs-PyTorch parity test"
                                        for mt, names in REFUSED.items() for m in names)
    both = coverage_problems(archs, meths, parity=[*PARITY_MATRIX, ParityCase("smolvlm-gqa", "tome", 0.25)])
    assert len(both) == 1 and "'tome' on architecture 'smolvlm' has PARITY_MATRIX rows" in both[0], both
    stale = coverage_problems(archs, meths, refused={**REFUSED, "toy_vlm": ("toy-method",)})
    assert sorted(stale) == ["REFUSED names architecture 'toy_vlm', which is not registered",
                             "REFUSED['toy_vlm'] names method 'toy-method', which is not registered"]


@pytest.mark.parametrize("model_type,config", [(mt, cfg) for mt in REFUSED for cfg in TINY_BY_MODEL_TYPE.get(mt, ())])
def test_refused_methods_are_refused_naming_what_applies(model_type, config, tiny_checkpoints, tmp_path):
    """REFUSED is the truth: on every tiny config of the architecture, each method it lists fails the build before
    any export, naming the capability it lacks and listing exactly the methods with parity rows there."""
    tested = {r.method for r in PARITY_MATRIX if r.config in TINY_BY_MODEL_TYPE[model_type]
              and methods.get(r.method).compresses}
    for m in REFUSED[model_type]:
        msg = refused_before_export(tiny_checkpoints[config], m, 0.25, tmp_path / m)
        assert "does not apply" in msg and any(CAPABILITIES[c] in msg for c in methods.get(m).requires), msg
        listed = msg.split("Methods that apply to it: ")[1].rstrip(".").split(", ")
        assert {x for x in listed if x in builtin_methods()} == tested, msg


def test_tiny_configs_are_of_their_model_type(tiny_checkpoints):
    """TINY_BY_MODEL_TYPE is right: each tiny checkpoint's config.json has that model_type."""
    for mt, cfgs in TINY_BY_MODEL_TYPE.items():
        for cfg in cfgs:
            assert json.loads((tiny_checkpoints[cfg] / "config.json").read_text())["model_type"] == mt, cfg
