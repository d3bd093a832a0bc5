# vtc: two commands on a fresh machine:  `make demo` (build + run the demo model)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch FIRST, pinned to the local CPU wheel: anything installed later that needs torch is then
# satisfied, instead of pulling a multi-GB CUDA build from the registry.
TORCH  ?= torch==2.13.0
DEMO_ART := artifacts/demo-llava-pool-r0.25

.PHONY: setup demo test test-all bench clean help

help:
	@echo "make demo    build the demo model at ratio 0.25, ask it one question, print a summary"
	@echo "make test    run the test suite (CPU, ONNX Runtime; TensorRT tests skip without TensorRT)"
	@echo "make bench   TTFT and decode latency on a bench-size random LLaVA vs HF transformers"
	@echo "make setup   create $(VENV) and install vtc with its export and test extras"

$(BIN)/.vtc-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[export,dev]'
	touch $@

setup: $(BIN)/.vtc-installed

demo: setup
	$(BIN)/vtc-export build --ratio 0.25 --output $(DEMO_ART) --force
	$(BIN)/vtc-export run $(DEMO_ART) --image examples/shapes.png --prompt "What shapes do you see?" --max-new-tokens 24
	$(BIN)/vtc-export inspect $(DEMO_ART)

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python tools/bench.py

clean:
	rm -rf artifacts .pytest_cache
