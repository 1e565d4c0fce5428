# churn-stream: `make run` starts the stack, `make test` runs the whole suite.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
RUN_STAMP := $(VENV)/.installed
JARS   := tests/kafka/target/jars

.DEFAULT_GOAL := help
.PHONY: help run test test-fast lint bench kafka-jars clean screenshot

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# The install is large (TensorFlow, XGBoost, scikit-learn, Streamlit: 2.5 GB in .venv with
# the test dependencies) and takes a few minutes the first time; pip shows its progress.
$(RUN_STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP) requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

run: $(RUN_STAMP)  ## Create the virtualenv and start the whole stack (Ctrl-C stops it).
	$(BIN)/churn up $(ARGS)

kafka-jars:  ## Resolve Apache Kafka's jars for the test broker (cached in ~/.m2).
	@if command -v mvn >/dev/null && command -v java >/dev/null; then \
		mvn -q -B -f tests/kafka/pom.xml dependency:copy-dependencies; \
	else echo "no java/mvn: tests fall back to the embedded Tansu broker"; fi

# Two workers (pytest-xdist), each with a broker of its own: most of the suite waits on
# services, brokers and training processes, so two at once took it from 16.8 to 9.4 minutes
# here. Every test has its own topics and database; TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP) kafka-jars  ## Install what the tests need and run the whole suite.
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

test-fast: $(STAMP)  ## The suite without the slow end-to-end tests.
	$(BIN)/python -m pytest -n $(TEST_WORKERS) -m "not slow and not faults"

lint: $(STAMP)  ## Lint and check formatting.
	$(BIN)/ruff check .

bench: $(STAMP)  ## Run the benchmarks; writes bench/results.md.
	$(BIN)/python -m bench

screenshot: $(STAMP)  ## Save docs/dashboard.png (needs Debian's chromium, chromium-driver).
	$(BIN)/python scripts/screenshot_dashboard.py $(ARGS)

clean:  ## Remove the virtualenv, caches and the local database.
	rm -rf $(VENV) .pytest_cache .ruff_cache data tests/kafka/target
