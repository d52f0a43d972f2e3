# Everything runs from the project's own virtualenv, created on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench bench-overhead clean proto

$(STAMP): pyproject.toml setup.py examples/epp-tenant-scorer/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# The example out-of-tree plugin package (examples/epp-tenant-scorer), as a plugin author installs one.
	$(BIN)/pip install -q --no-deps -e ./examples/epp-tenant-scorer
	# xds-protos bundles an old copy of OpenTelemetry's protos: put opentelemetry-proto's own files back on top.
	$(BIN)/pip install -q --force-reinstall --no-deps "opentelemetry-proto==$$($(BIN)/python -c \
		'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)  ## sim pods + EPP + real Envoy, then real requests through every API
	$(BIN)/python -m epp.stack.demo

test: $(STAMP)  ## lint + unit + end-to-end tests
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider

proto: $(STAMP)  ## compile proto/ (EPP's own gRPC contracts) into epp/remote/, committed with the .proto
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. $$(find proto -name '*.proto')

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)  ## routing quality: the same workloads through Envoy RR, Envoy + EPP, vllm-router (~8 min)
	$(BIN)/python -m bench.quality

bench-overhead: $(STAMP)  ## EPP's own cost: added latency per request, highest request rate, 220 KB prompts x150 (~7 min)
	$(BIN)/python -m bench.overhead

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
