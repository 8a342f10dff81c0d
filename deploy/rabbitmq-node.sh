#!/bin/sh
# docker-compose.ha.yml: the entrypoint of each RabbitMQ node. The nodes of a cluster must share
# one Erlang cookie: written from UPLINE_RABBITMQ_COOKIE (.env) to the file both the server and
# the CLI tools (health checks) read, then the image's own entrypoint runs.
set -eu
: "${UPLINE_RABBITMQ_COOKIE:?set UPLINE_RABBITMQ_COOKIE in .env (see .env.example)}"
cookie=/var/lib/rabbitmq/.erlang.cookie
umask 077
printf '%s' "$UPLINE_RABBITMQ_COOKIE" >"$cookie"
chown rabbitmq:rabbitmq "$cookie" 2>/dev/null || true
chmod 400 "$cookie"
unset UPLINE_RABBITMQ_COOKIE
exec docker-entrypoint.sh rabbitmq-server
