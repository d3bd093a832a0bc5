# vtc: two commands on a fresh machine:  `make demo` (build + run the demo model)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch FIRST, pinned to the local CPU wheel: anything installed later that needs torch is then
# satisfied, instead of pulling a multi-GB CUDA build from the registry.
TORCH  ?= torch==2.13.0
# FastV: the method that keeps the demo model's answers best at 0.25 (README, Accuracy); the CLI default is pool
DEMO_ART := artifacts/demo-llava-fastv-r0.25

ACC_DIR  := artifacts/sweep-accuracy

.PHONY: setup demo test test-all bench bench-openvino bench-scale accuracy train-demo clean help

help:
	@echo "make demo    build the demo model with FastV at ratio 0.25, ask it one question, score it, print a summary"
	@echo "make test    run the test suite (CPU, ONNX Runtime; TensorRT tests skip without TensorRT)"
	@echo "make bench   TTFT and decode latency on a bench-size random LLaVA vs HF transformers, SmolVLM-256M geometry (build RSS, TTFT, decode), a bench-size Qwen2.5-VL-like model (TTFT at 1.0 vs 0.25 per method, KV bytes), then make accuracy"
	@echo "make bench-openvino  vtc (fp32, int8, int4, int4 + pool 0.25) against OpenVINO GenAI int8 on this machine, interleaved (makes $(OV_VENV))"
	@echo "make bench-scale  build a random-weight LLaVA-1.5-7B-geometry checkpoint (fp16; 2 and 32 LLM layers): time, peak RSS, size, latency"
	@echo "make accuracy  accuracy per question type x method x ratio (and KV dtype, quantized weights) of the demo model -> $(ACC_DIR)/accuracy.md"
	@echo "make train-demo  retrain the demo model from scratch (CPU, about 50 min on 2 cores) into export/data/demo-model"
	@echo "make setup   create $(VENV) and install vtc with its export and test extras"

$(BIN)/.vtc-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[export,dev]'
	touch $@

setup: $(BIN)/.vtc-installed

demo: setup
	$(BIN)/vtc-export build --method fastv --ratio 0.25 --output $(DEMO_ART) --force
	$(BIN)/vtc-export run $(DEMO_ART) --image examples/shapes.png --prompt "what color is the circle?"
	$(BIN)/vtc-export eval $(DEMO_ART) --dataset synthetic --limit 60
	$(BIN)/vtc-export inspect $(DEMO_ART)

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python tools/bench.py
	$(BIN)/python tools/bench_context.py
	$(BIN)/python tools/bench_smolvlm.py --image-splits 0
	$(BIN)/python tools/bench_smolvlm.py --image-splits 2 2
	$(BIN)/python tools/bench_qwen.py
	$(MAKE) accuracy

# OpenVINO GenAI beside vtc (tools/bench_openvino.py). Its own venv: optimum-intel pins transformers < 5.6. torch
# first (the local CPU wheel, also as a constraint); optimum-intel without its torchvision requirement (no CPU
# torchvision here; the LLaVA export does not use it), then the rest of its requirements.
OV_VENV := .venv-openvino
$(OV_VENV)/.installed:
	$(PYTHON) -m venv $(OV_VENV)
	$(OV_VENV)/bin/python -m pip install --quiet $(TORCH)
	echo "$(TORCH)" > $(OV_VENV)/constraints.txt
	$(OV_VENV)/bin/python -m pip install --quiet -c $(OV_VENV)/constraints.txt --no-deps 'optimum-intel==2.2.0'
	$(OV_VENV)/bin/python -m pip install --quiet -c $(OV_VENV)/constraints.txt 'optimum~=2.3.0' \
		'transformers>=4.51,<5.6' 'huggingface-hub<1.22' nncf 'openvino==2026.4.*' 'openvino-tokenizers==2026.4.*' \
		'openvino-genai==2026.4.*' pillow setuptools 'requests>=2.33'
	touch $@

bench-openvino: setup $(OV_VENV)/.installed
	$(BIN)/python tools/bench_openvino.py --ov-python $(OV_VENV)/bin/python

# Real scale: needs ~30 GB of disk and, for the 32-layer build, most of a 24 GB machine (see README, Real scale).
bench-scale: setup
	$(BIN)/python tools/bench_scale.py

# One command for the README's accuracy tables: every method at 0.5/0.25/0.11 with an fp32 KV cache, then the
# uncompressed model and pool at 0.25 with INT8 and FP8 KV caches, then int8, int4 (RTN) and int4-AWQ LLM weights
# uncompressed and with FastV at 0.25, each with fp32 and INT8 KV caches, beside their fp-weights rows (only FastV
# 0.25 with INT8 KV is new; int4 blocks of 64: the demo's 192-wide layers take no 128), 500 held-out questions each.
# Resumable.
accuracy: setup
	$(BIN)/vtc-export sweep --methods all --ratios 1.0,0.5,0.25,0.11 --eval 500 --runs 3 --output $(ACC_DIR)
	$(BIN)/vtc-export sweep --methods pool --ratios 1.0,0.25 --kv-cache int8,fp8 --eval 500 --runs 3 --output $(ACC_DIR)
	$(BIN)/vtc-export sweep --methods fastv --ratios 1.0,0.25 --kv-cache fp32,int8 --weights fp,int8,int4,int4-awq \
		--group-size 64 --eval 500 --runs 3 --output $(ACC_DIR)
	@cat $(ACC_DIR)/accuracy.md

train-demo: setup
	$(BIN)/python tools/train_demo.py --out export/data/demo-model

clean:
	rm -rf artifacts .pytest_cache
