# The two commands of the quick start: `make serve` and `make test`.
PORT ?= 8080
ARGS ?=

.PHONY: setup serve test bench model

setup:
	@bash scripts/setup.sh

serve: setup
	.venv/bin/loom serve --port $(PORT) $(ARGS)

test: setup
	.venv/bin/python -m pytest -q $(ARGS)

bench: setup
	.venv/bin/python bench/throughput.py $(ARGS)

model: setup
	.venv/bin/python scripts/train_tiny.py
