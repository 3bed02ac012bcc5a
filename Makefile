# The two commands that set up a fresh machine and run: `make demo` and `make test`.
PY := .venv/bin/python
export PATH := $(PATH):/usr/sbin:/sbin

.PHONY: setup setup-bench demo test lint unit bench soak clean

setup:
	@scripts/bootstrap.sh

setup-bench:
	@scripts/bootstrap.sh bench

demo: setup
	$(PY) -m netlab.demo

lint: setup
	$(PY) -m ruff check sockmap netlab tests bench
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q -ra

unit: setup
	$(PY) -m pytest -q tests/unit tests/fuzz

bench: setup-bench
	$(PY) -m bench.run

soak: setup-bench
	$(PY) -m bench.soak

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
