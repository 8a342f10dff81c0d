#!/bin/sh
# docker-compose.ha.yml: the entrypoint of the hot standby (run as the postgres user). On the
# first start (an empty volume) it copies the primary with `pg_basebackup -R`, which also writes
# primary_conninfo and standby.signal, retrying until the primary answers; then it runs
# postgres, streaming from the primary. After a failover (docs/operations.md), rebuild the old
# primary as a standby of the new one: an empty volume and this same script, pointed at it.
set -eu
: "${PGPASSWORD:?set POSTGRES_REPLICATION_PASSWORD in .env (see .env.example)}"
PGDATA=${PGDATA:-/var/lib/postgresql/data}
primary=${PRIMARY_HOST:-postgres}
port=${PRIMARY_PORT:-5432}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  until pg_basebackup -h "$primary" -p "$port" -U "${REPLICATION_USER:-replicator}" \
    -D "$PGDATA" -R -X stream -c fast --no-password; do
    echo "postgres-standby: the primary $primary:$port does not answer yet; retrying in 2 s" >&2
    rm -rf "${PGDATA:?}"/* 2>/dev/null || true
    sleep 2
  done
  chmod 700 "$PGDATA"
fi
exec postgres -D "$PGDATA" "$@"
