# The two commands a newcomer types (README.md): `make demo` and `make test`. Both set up .venv first.
.PHONY: setup test test-fast demo bench clean-venv

setup:
	bash tools/setup.sh

test: setup
	bash tools/test.sh

test-fast: setup
	.venv/bin/python -m pytest -m "not slow" -q

demo: setup
	.venv/bin/python tools/demo.py

clean-venv:
	rm -rf .venv
