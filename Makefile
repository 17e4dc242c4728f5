# make test: lint, type-check and run the whole suite against the local PostgreSQL and RabbitMQ.
# make demo: the main job end to end (migrate, relay, workers, load, verify).
VENV   ?= .venv
PYTHON ?= python3
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: install services tools test lint demo bench chaos soak clean cluster-up cluster-down chaos-cluster

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Start the machine's PostgreSQL and RabbitMQ when they are down (deploy/local/services.sh);
# `tools` also installs promtool (the Debian package prometheus) when it is missing and we are root.
services:
	bash deploy/local/services.sh

tools:
	bash deploy/local/services.sh --tools

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

test: tools lint
	$(BIN)/pytest

demo: services $(STAMP)
	$(BIN)/eventfleet demo

bench: services $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m bench.append
	$(BIN)/python -m bench.relay
	$(BIN)/python -m bench.pipeline
	$(BIN)/python -m bench.catchup
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.reactors
	$(BIN)/python -m bench.rebuild
	$(BIN)/python -m bench.fanout

# make chaos: the fault-injection suite, longer than its CI run; figures go to CHAOS_REPORT (RELIABILITY.md).
CHAOS_SECONDS ?= 60
CHAOS_REPEAT  ?= 2
CHAOS_RATE    ?= 100
CHAOS_REPORT  ?= /tmp/eventfleet-chaos-report.jsonl
chaos: services $(STAMP)
	rm -f $(CHAOS_REPORT)
	EVENTFLEET_CHAOS_SECONDS=$(CHAOS_SECONDS) EVENTFLEET_CHAOS_REPEAT=$(CHAOS_REPEAT) EVENTFLEET_CHAOS_RATE=$(CHAOS_RATE) \
	EVENTFLEET_CHAOS_REPORT=$(CHAOS_REPORT) $(BIN)/pytest tests/chaos -s -q --timeout=3600
	$(BIN)/python -m tests.chaos.report $(CHAOS_REPORT)

# make cluster-up / cluster-down: a 3-node RabbitMQ cluster of its own (ef1-3@localhost, AMQP 5681-5683) beside the
# machine's default node, which it never touches (deploy/local/cluster.sh; `up` prints EVENTFLEET_AMQP_URL).
cluster-up: $(STAMP)
	bash deploy/local/cluster.sh up

cluster-down: $(STAMP)
	bash deploy/local/cluster.sh down

# make chaos-cluster: the RabbitMQ cluster scenarios (tests/cluster) with longer faults and loads than in CI;
# figures per scenario to CLUSTER_REPORT, printed as the tables of RELIABILITY.md.
CLUSTER_SECONDS ?= 60
CLUSTER_REPORT  ?= /tmp/eventfleet-cluster-report.jsonl
chaos-cluster: services $(STAMP)
	rm -f $(CLUSTER_REPORT)
	EVENTFLEET_CLUSTER_SECONDS=$(CLUSTER_SECONDS) EVENTFLEET_CLUSTER_REPORT=$(CLUSTER_REPORT) \
	$(BIN)/pytest tests/cluster/test_rabbit_cluster.py -m cluster -s -q --timeout=3600
	$(BIN)/python -m tests.cluster.rabbit_fleet $(CLUSTER_REPORT)

# make soak: 10 minutes at a steady moderate rate, no faults: RSS, lag, nothing lost (not in CI).
soak: services $(STAMP)
	$(BIN)/python -m tests.chaos.soak

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
