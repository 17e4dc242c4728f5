#!/usr/bin/env bash
# Set-up shared by `make test`, `make demo` and .ci/run: make sure PostgreSQL and RabbitMQ answer on
# 127.0.0.1, starting the machine's own when they are down, and (with --tools) that promtool is there.
# It only starts what is down and installs what is missing; it never reconfigures a running service.
set -euo pipefail

want_tools=0
for arg in "$@"; do
  case "$arg" in
    --tools) want_tools=1 ;;
    *) echo "usage: $0 [--tools]" >&2; exit 2 ;;
  esac
done

pg_host=127.0.0.1 pg_port=5432
promtool=${EVENTFLEET_PROMTOOL:-promtool}  # the tests point this at a missing name to see the message
root=0; [ "$(id -u)" = 0 ] && [ "${EVENTFLEET_SETUP_NO_INSTALL:-0}" != 1 ] && root=1

postgres_up() { pg_isready -q -h "$pg_host" -p "$pg_port" 2>/dev/null; }
rabbit_up() { rabbitmqctl -q status >/dev/null 2>&1; }

if ! postgres_up; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    version=$(ls /etc/postgresql | head -n1)
    echo "services: starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 30); do postgres_up && break; sleep 1; done
  fi
  postgres_up || { echo "services: PostgreSQL is not answering on $pg_host:$pg_port; start it (Debian: pg_ctlcluster <version> main start)" >&2; exit 1; }
fi

if ! rabbit_up; then
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "services: starting RabbitMQ"
    rabbitmq-server -detached || true
  fi
fi
if command -v rabbitmqctl >/dev/null 2>&1; then
  rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1 || true
fi
rabbit_up || { echo "services: RabbitMQ is not answering; start it (rabbitmq-server -detached)" >&2; exit 1; }

if [ "$want_tools" = 1 ] && ! command -v "$promtool" >/dev/null 2>&1; then
  if [ "$root" = 1 ] && command -v apt-get >/dev/null 2>&1; then
    echo "services: installing the Debian package prometheus (promtool, for the alert-rule tests)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null) \
      || echo "services: could not install the Debian package prometheus; the promtool tests will fail" >&2
  else
    echo "services: promtool is missing: install the Debian package 'prometheus' (as root: apt-get install prometheus)" >&2
  fi
fi
echo "services: PostgreSQL and RabbitMQ are up"
