#!/usr/bin/env bash
# `make cluster-up` / `make cluster-down`: a 3-node RabbitMQ cluster of its own on this machine, beside the machine's
# default node (which it never touches): ef1@localhost, ef2@localhost, ef3@localhost on AMQP ports 5681-5683
# (distribution 25681-25683), guest/guest on 127.0.0.1, data and logs in a temporary directory. `up` prints the
# EVENTFLEET_AMQP_URL naming every node; `down` stops the nodes and deletes everything they wrote.
# The work is tests/cluster/rabbit.py's (RabbitCluster, the same harness the cluster tests use); its state between
# `up` and `down` is in EVENTFLEET_CLUSTER_STATE (default $TMPDIR/eventfleet-rabbit-cluster.json).
# EVENTFLEET_CLUSTER_AMQP_PORT / EVENTFLEET_CLUSTER_DIST_PORT move the ports, EVENTFLEET_CLUSTER_SIZE the count.
set -euo pipefail

cd "$(dirname "$0")/../.."
python=${PYTHON:-.venv/bin/python}

case "${1:-}" in
  up)
    # A node with a few hundred quorum queues stops answering at the default 1024 open files.
    ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    exec "$python" -m tests.cluster.rabbit up
    ;;
  down) exec "$python" -m tests.cluster.rabbit down ;;
  status) exec "$python" -m tests.cluster.rabbit status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
