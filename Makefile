# make install: virtual environment with the pinned requirements; make test: the whole suite, offline, on CPU.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo lint bench clean

install: .venv/.installed

.venv/.installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch .venv/.installed

test: install
	HYPOTHESIS_PROFILE=ci $(PY) -m pytest -m "not gpu" -p no:cacheprovider tests

demo: install
	$(PY) -m toy.demo --out runs/demo

lint: install
	$(PY) -m ruff check .

bench: install
	$(PY) -m benchmarks --out runs/bench

clean:
	rm -rf runs .pytest_cache
