# The two commands a fresh machine needs. Both create/refresh .venv first.
.PHONY: demo test lint bench venv
venv:
	@scripts/bootstrap.sh

demo: venv
	.venv/bin/mergeability demo

# Lint, then the import-cycle check, then the tests; each fails the target. pytest's exit 5 (no test ran) is a
# failure too, said in words.
test: venv lint
	.venv/bin/python scripts/check_imports.py
	@.venv/bin/python -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing" >&2; fi; \
	  exit $$rc

lint: venv
	.venv/bin/python -m ruff check src tests benchmarks scripts

bench: venv
	.venv/bin/python benchmarks/bench_merge.py
	.venv/bin/python benchmarks/bench_trials.py
	.venv/bin/python benchmarks/bench_train.py
	.venv/bin/python benchmarks/bench_tasks.py
