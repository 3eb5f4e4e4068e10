# The two commands a newcomer types: `make demo` and `make test`. Everything else is for us.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= $(shell nproc)

.PHONY: venv demo demo-quick test test-slow test-llamacpp llamacpp bench bench-quick clean

venv:
	@scripts/setup_venv.sh

demo: venv
	$(PY) -m distillery.cli demo

demo-quick: venv
	$(PY) -m distillery.cli demo --quick

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

llamacpp: venv
	@scripts/build_llamacpp_wheel.sh
	$(PY) -m pip install --quiet --no-deps .cache/wheels/llama_cpp_python-*.whl
	$(PY) -m pip install --quiet -c constraints.txt diskcache "fastapi" "uvicorn" "sse-starlette" "starlette-context" "pydantic-settings"

test-llamacpp: llamacpp
	$(PY) -m pytest -q -m llamacpp

bench-quick: venv
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/run_all.py --quick

bench: venv
	$(PY) -m pip install --quiet -c constraints.txt -e ".[bench]"
	$(PY) benchmarks/run_all.py

clean:
	rm -rf .venv runs .pytest_cache
