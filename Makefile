# effvision: the two commands are `make demo` and `make test` (see README.md).
PY := .venv/bin/python
PYTEST := $(PY) -m pytest

.PHONY: install demo demo-uda demo-panoptic test test-all lint format clean

install:
	@bash tools/install.sh

demo: install
	@$(PY) tools/quickstart.py

demo-uda: install
	@$(PY) tools/uda_demo.py

demo-panoptic: install
	@$(PY) tools/panoptic_demo.py

test: install lint
	$(PYTEST) -q

test-all: install lint
	$(PYTEST) -q -m ''

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

format: install
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

clean:
	rm -rf work_dirs .pytest_cache .ruff_cache
