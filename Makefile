# Two commands do all the set-up on a fresh machine:
#   make demo   — create/refresh .venv, run the built-in demo audit
#   make test   — create/refresh .venv, lint, run the test suite
# TORCH picks the torch to install: the CPU build 2.13.0 by default,
# e.g. `make test TORCH='torch>=2.4'` for another. The frameworks the tests drive
# (Lightning, transformers, accelerate) and IPython install next to it, with the installed
# torch pinned (.venv/constraints.txt) so pip never swaps in another build.

PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.reprocheck-installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-slow lint format bench clean

venv:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@want="$(TORCH) $$(cksum < pyproject.toml)"; \
	if [ "$$(cat $(STAMP) 2>/dev/null)" != "$$want" ]; then \
		echo "installing $(TORCH) and reprocheck[dev] into $(VENV)"; \
		$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)" && \
		$(BIN)/python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" \
			> $(VENV)/constraints.txt && \
		$(BIN)/python -m pip install -q --disable-pip-version-check -c $(VENV)/constraints.txt \
			-e ".[dev,frameworks,notebook]" && \
		echo "$$want" > $(STAMP); \
	fi

demo: venv
	$(BIN)/reprocheck run configs/demo.yaml

lint: venv
	$(BIN)/ruff check reprocheck tests benchmarks examples
	$(BIN)/ruff format --check reprocheck tests benchmarks examples

format: venv
	$(BIN)/ruff format reprocheck tests benchmarks examples
	$(BIN)/ruff check --fix reprocheck tests benchmarks examples

# pytest exits 5 when it collected no test: that is a failure, never a pass.
test: venv lint
	@$(BIN)/python -m pytest --durations=10 $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test-slow: venv
	@$(BIN)/python -m pytest -m slow $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: venv
	$(BIN)/python benchmarks/bench_fingerprint.py --markdown
	$(BIN)/python benchmarks/bench_audit.py --markdown
	$(BIN)/python benchmarks/bench_time_to_answer.py --markdown
	$(BIN)/python benchmarks/bench_self_checks.py --markdown
	$(BIN)/python benchmarks/bench_resume.py --markdown
	$(BIN)/python benchmarks/bench_long_runs.py --markdown
	$(BIN)/python benchmarks/bench_script_hooks.py --markdown
	$(BIN)/python benchmarks/bench_address_order.py --markdown
	$(BIN)/python benchmarks/bench_device_digest.py --markdown
	$(BIN)/python benchmarks/bench_ddp.py --markdown
	$(BIN)/python benchmarks/bench_report.py --markdown

clean:
	rm -rf $(VENV) reports/*-2*
