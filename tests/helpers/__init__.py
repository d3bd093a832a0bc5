"""Shared test code (no tests here): imported by the test files and conftest.py, never one test file from another.

  tiny       the tiny random checkpoints (TINY), which architecture each stands for, a SigLIP (no [CLS]) LLaVA
  images     the seeded random test images
  parity     PROMPT, NEW_TOKENS and the artifact-vs-PyTorch parity checks
  graphs     static-graph checks on exported ONNX
  builds     build-step callbacks: nullstep, and a build that must be refused before export
  matrix     PARITY_MATRIX, LINT_MATRIX, KV_MATRIX: the combinations the suite builds and checks
  isolation  a fresh interpreter in which torch and transformers cannot be imported
  jetson     fake Jetson tools (tegrastats, nvpmodel, jetson_clocks) for PATH
"""
