# The two commands of the README. Both set everything up first (idempotent).
.PHONY: setup demo bench test clean

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/python -m mtllm_locally.bench loop

bench: setup
	.venv/bin/python -m mtllm_locally.bench inference
	.venv/bin/python -m mtllm_locally.bench adapters
	.venv/bin/python -m mtllm_locally.bench jac
	.venv/bin/python -m mtllm_locally.bench typed
	.venv/bin/python -m mtllm_locally.bench train
	.venv/bin/python -m mtllm_locally.bench loop
	.venv/bin/python -m mtllm_locally.bench robustness
	.venv/bin/python -m mtllm_locally.bench amx

test: setup
	.venv/bin/python -m pytest -q tests

clean:
	rm -rf .venv build dist
