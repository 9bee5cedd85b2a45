# The two commands a fresh machine needs. Both create/refresh .venv first.
.PHONY: demo test bench venv
venv:
	@scripts/bootstrap.sh

demo: venv
	.venv/bin/mergeability demo

test: venv
	.venv/bin/python -m pytest -q

bench: venv
	.venv/bin/python benchmarks/bench_merge.py
	.venv/bin/python benchmarks/bench_trials.py
	.venv/bin/python benchmarks/bench_train.py
	.venv/bin/python benchmarks/bench_tasks.py
