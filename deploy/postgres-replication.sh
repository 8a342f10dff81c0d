#!/bin/sh
# docker-compose.ha.yml: run once by the postgres image when the primary's volume is created
# (/docker-entrypoint-initdb.d). Creates the role the standby replicates as, lets it connect for
# replication with its password, and makes replication synchronous from the next start on: a
# commit, and so the acknowledgement of the purchases it recorded, returns only once the
# standby has it (docs/operations.md). Until a standby streams, commits wait.
# No `set -u`: the image's entrypoint sources this file when it is not executable.
set -e
: "${POSTGRES_REPLICATION_PASSWORD:?set POSTGRES_REPLICATION_PASSWORD in .env (see .env.example)}"
psql -v ON_ERROR_STOP=1 -v password="$POSTGRES_REPLICATION_PASSWORD" \
  --username "${POSTGRES_USER:-postgres}" --dbname postgres <<'SQL'
create role replicator with replication login password :'password';
alter system set synchronous_standby_names = '*';
SQL
echo "host replication replicator all scram-sha-256" >>"$PGDATA/pg_hba.conf"
