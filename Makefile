# The two commands a fresh machine needs. Both create/refresh .venv first: `demo` with what running needs,
# `test` with the test tools too.
.PHONY: demo test lint bench venv venv-test
venv:
	@scripts/bootstrap.sh run

venv-test:
	@scripts/bootstrap.sh test

demo: venv
	.venv/bin/mergeability demo

# Lint, then the import-cycle check, then the tests; each fails the target. pytest's exit 5 (no test ran) is a
# failure too, said in words.
test: venv-test lint
	.venv/bin/python scripts/check_imports.py
	@.venv/bin/python -m pytest -q; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing" >&2; fi; \
	  exit $$rc

lint: venv-test
	.venv/bin/python -m ruff check src tests benchmarks scripts

bench: venv-test
	.venv/bin/python benchmarks/bench_merge.py
	.venv/bin/python benchmarks/bench_trials.py
	.venv/bin/python benchmarks/bench_train.py
	.venv/bin/python benchmarks/bench_tasks.py
