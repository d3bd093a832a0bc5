"""The combinations the suite builds and checks: the single source of truth for the parametrized tests.

PARITY_MATRIX  (tiny config, method, ratio, method options): each artifact's runtime output is checked against
               PyTorch (ratio 1.0 / "none": HF `generate`, test_parity_generate.py; the others: the method's
               PyTorch reference, test_parity_generate.py and test_method_*.py; SmolVLM / Idefics3: test_smolvlm.py).
               Every test that checks parity parametrizes from `parity_cases(method, ...)`.
REFUSED        model type -> the methods its vision side cannot serve (a method's `requires`): no parity rows;
               test_registries.py checks that each is refused on every tiny config of it, naming what applies.
LINT_MATRIX    the methods whose exported graphs tests/test_lint.py lints: `LINT_CONFIG` at `LINT_RATIO` ("none":
               uncompressed), the in-LLM methods split at layer 1 -- the same artifacts as the parity rows.
KV_MATRIX      the quantized-KV-cache artifacts of test_kv_quant.py.

Artifacts are shared through conftest.py's `artifact_factory` (one build per distinct key); a row added here is
a build added to the suite. tests/test_registries.py checks that every registered architecture has a tiny
config and every registered method has parity and lint rows.
"""

from __future__ import annotations

from typing import NamedTuple

from tests.helpers.tiny import TINY_BY_MODEL_TYPE


class ParityCase(NamedTuple):
    config: str  # a name in tests.helpers.tiny.ALL_TINY
    method: str
    ratio: float  # 1.0 for "none" (the uncompressed model)
    options: dict = {}  # --method-opt values; never mutated (tests pass a copy)


# The in-LLM methods split the LLM at layer 1 on the 2-layer tiny LLMs (mha-default, gqa-full); mqa-layer-1 has
# 3 layers and takes the method's default layer.
_LAYER_1 = {"layer": "1"}

PARITY_MATRIX: tuple[ParityCase, ...] = (
    # uncompressed = HF generate (test_parity_generate.py)
    ParityCase("mha-default", "none", 1.0),
    ParityCase("gqa-full", "none", 1.0),
    ParityCase("mqa-layer-1", "none", 1.0),
    # test_parity_generate.py
    ParityCase("mha-default", "pool", 0.25),
    ParityCase("gqa-full", "pool", 0.25),
    ParityCase("mqa-layer-1", "pool", 0.25),
    ParityCase("mha-default", "cls-attn", 0.25),
    ParityCase("gqa-full", "cls-attn", 0.25),
    ParityCase("mqa-layer-1", "cls-attn", 0.25),
    # test_method_visionzip.py
    ParityCase("mha-default", "visionzip", 0.25),
    ParityCase("gqa-full", "visionzip", 0.25),
    ParityCase("mqa-layer-1", "visionzip", 0.25),
    ParityCase("mha-default", "visionzip", 0.5),
    # test_method_tome.py
    ParityCase("mha-default", "tome", 0.25),
    ParityCase("gqa-full", "tome", 0.25),
    ParityCase("mqa-layer-1", "tome", 0.25),
    ParityCase("gqa-full", "tome", 0.5),
    # test_method_divprune.py
    ParityCase("mha-default", "divprune", 0.25),
    ParityCase("gqa-full", "divprune", 0.25),
    ParityCase("mqa-layer-1", "divprune", 0.25),
    ParityCase("gqa-full", "divprune", 0.5),
    # test_method_baselines.py
    ParityCase("mha-default", "uniform", 0.25),
    ParityCase("gqa-full", "uniform", 0.25),
    ParityCase("mqa-layer-1", "uniform", 0.25),
    ParityCase("mha-default", "random", 0.25),
    ParityCase("gqa-full", "random", 0.25),
    ParityCase("mqa-layer-1", "random", 0.25),
    # test_method_in_llm.py
    ParityCase("mha-default", "fastv", 0.25, _LAYER_1),
    ParityCase("gqa-full", "fastv", 0.25, _LAYER_1),
    ParityCase("mqa-layer-1", "fastv", 0.25, {}),
    ParityCase("mha-default", "tokencarve", 0.25, _LAYER_1),
    ParityCase("gqa-full", "tokencarve", 0.25, _LAYER_1),
    ParityCase("mqa-layer-1", "tokencarve", 0.25, {}),
    # SmolVLM / Idefics3 at the global-image layout (test_smolvlm.py: "none" = HF generate fed by HF's processor,
    # the others = the PyTorch reference); their 2-layer LMs split at layer 1. Tiled layouts: test_smolvlm.py.
    ParityCase("smolvlm-gqa", "none", 1.0),
    ParityCase("idefics3-mqa", "none", 1.0),
    ParityCase("smolvlm-gqa", "pool", 0.25),
    ParityCase("idefics3-mqa", "pool", 0.25),
    ParityCase("smolvlm-gqa", "random", 0.25),
    ParityCase("idefics3-mqa", "random", 0.25),
    ParityCase("smolvlm-gqa", "uniform", 0.25),
    ParityCase("idefics3-mqa", "uniform", 0.25),
    ParityCase("smolvlm-gqa", "divprune", 0.25),
    ParityCase("idefics3-mqa", "divprune", 0.25),
    ParityCase("smolvlm-gqa", "fastv", 0.25, _LAYER_1),
    ParityCase("idefics3-mqa", "fastv", 0.25, _LAYER_1),
    ParityCase("smolvlm-gqa", "tokencarve", 0.25, _LAYER_1),
    ParityCase("idefics3-mqa", "tokencarve", 0.25, _LAYER_1),
    # Qwen2.5-VL / Qwen2-VL at their built --image-size (tests/helpers/tiny.py TINY_QWEN; test_qwen2_5_vl.py:
    # "none" = HF generate fed by HF's processor on every config, the others = the PyTorch reference with the same
    # selection and M-RoPE positions). qwen25-windows has 3 LLM layers, qwen2-vl 2 (split at layer 1).
    ParityCase("qwen25-tied", "none", 1.0),
    ParityCase("qwen25-windows", "none", 1.0),
    ParityCase("qwen2-vl", "none", 1.0),
    *(ParityCase("qwen25-windows", m, 0.25, _LAYER_1 if m in ("fastv", "tokencarve") else {})
      for m in ("pool", "random", "uniform", "divprune", "fastv", "tokencarve")),
    *(ParityCase("qwen2-vl", m, 0.25, _LAYER_1 if m in ("fastv", "tokencarve") else {})
      for m in ("pool", "random", "uniform", "divprune", "fastv", "tokencarve")),
)

# Methods that need a vision [CLS] token (cls-attn, VisionZip, ToMe) do not apply to SigLIP without one.
REFUSED: dict[str, tuple[str, ...]] = {
    "smolvlm": ("cls-attn", "visionzip", "tome"),
    "idefics3": ("cls-attn", "visionzip", "tome"),
    "qwen2_5_vl": ("cls-attn", "visionzip", "tome"),
    "qwen2_vl": ("cls-attn", "visionzip", "tome"),
}

# tests/test_lint.py lints LINT_CONFIG's artifact of each method at LINT_RATIO (see its `method_artifact`).
LINT_CONFIG, LINT_RATIO = "mha-default", 0.25
LINT_MATRIX: tuple[str, ...] = ("none", "pool", "cls-attn", "visionzip", "tome", "divprune", "random", "uniform",
                                "fastv", "tokencarve")


class KVCase(NamedTuple):
    config: str
    method: str
    ratio: float
    kv_caches: tuple[str, ...]  # every KV dtype built (fp32: the reference the others are compared with)
    calibrated: tuple[str, ...]  # those with calibrated scales and a recorded accuracy


KV_MATRIX = KVCase("gqa-full", "pool", 0.25, kv_caches=("fp32", "int8", "fp8", "fp16"), calibrated=("int8", "fp8"))


def parity_cases(*methods: str, model_types: tuple[str, ...] = ("llava",)) -> list[ParityCase]:
    """PARITY_MATRIX's rows of `methods` (none given: all) on the tiny configs of `model_types`, method by method
    (in the order given), each in matrix order. The default is LLaVA: the test_method_*.py files check against
    LLaVA's HF classes; test_smolvlm.py takes the SmolVLM / Idefics3 rows."""
    configs = {cfg for mt in model_types for cfg in TINY_BY_MODEL_TYPE[mt]}
    rows = [c for c in PARITY_MATRIX if c.config in configs]
    methods = methods or tuple(dict.fromkeys(c.method for c in rows))
    unknown = set(methods) - {c.method for c in rows}
    assert not unknown, f"no PARITY_MATRIX rows for {sorted(unknown)} on {', '.join(model_types)}"
    return [c for m in methods for c in rows if c.method == m]
