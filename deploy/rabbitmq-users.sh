#!/bin/sh
# Creates or updates upline's least-privilege RabbitMQ users through the management HTTP API,
# and sets their permissions on one vhost. Idempotent: run it again to change a password or
# to restore the permissions. Needs only POSIX sh and curl. Prints what it did, never a
# password (they reach curl on its standard input, not on its command line).
#
# Environment:
#   RABBITMQ_ADMIN_USER, RABBITMQ_ADMIN_PASSWORD   an administrator of the broker (required)
#   RABBITMQ_MANAGEMENT_URL   management API       (default http://127.0.0.1:15672)
#   RABBITMQ_VHOST            vhost, created if missing (default /)
#   UPLINE_AMQP_USER_PREFIX   prefix of the four service users (default "upline-")
#   UPLINE_API_AMQP_PASSWORD, UPLINE_WORKER_AMQP_PASSWORD, UPLINE_NOTIFIER_AMQP_PASSWORD,
#   UPLINE_WEBHOOKS_AMQP_PASSWORD
#                             the service users' passwords (required, not empty)
#   UPLINE_PRODUCER_AMQP_USER, UPLINE_PRODUCER_AMQP_PASSWORD
#                             optional: one external producer, who may only publish purchases
#   RABBITMQ_WAIT_SECS        how long to wait for the management API to answer (default 60)
#
# The users and their permissions (configure / write / read), each verified against RabbitMQ
# by tests/it/broker_permissions.rs:
#   <prefix>api, producer  ^$ / ^upline\.purchases$ / ^$
#       publish to the upline.purchases exchange, nothing else (passive declares need no
#       permission, so the api can still check that the exchange exists).
#   <prefix>worker         ^upline\.(purchases|purchases\.dlx|purchases\.dead|earnings)$ (both)
#                          / ^upline\.purchases(\.dlx)?$
#       declares the topology: a queue declared with x-dead-letter-exchange needs write on
#       the DLX, queue.bind needs write on the queue and read on the exchange; consumes
#       upline.purchases, publishes dead letters to upline.purchases.dlx and earnings to
#       upline.earnings.
#   <prefix>notifier       ^amq\.gen-.*$ / ^amq\.gen-.*$ / ^(amq\.gen-.*|upline\.earnings)$
#       its own server-named exclusive queue, bound to upline.earnings, consumed.
#   <prefix>webhooks       ^upline\.webhooks\.(earnings|purchases)$ (both)
#                          / ^(upline\.webhooks\.(earnings|purchases)|upline\.earnings|upline\.purchases)$
#       declares its two queues and binds them to upline.earnings and upline.purchases
#       (binding needs read on the exchange), consumes them. RabbitMQ permissions do not tell
#       an exchange from a queue of the same name, so this user could also read the workers'
#       queue upline.purchases: give it to the webhooks service only.
# None of them gets a management tag: they cannot use the management UI or API.

set -eu

fail() {
    printf 'rabbitmq-users: %s\n' "$*" >&2
    exit 1
}

# Refuses a missing or empty value: a user with an empty password is never created.
require() {
    eval "value=\${$1-}"
    [ -n "$value" ] || fail "$1 must be set and not empty"
    case $value in
        *'
'*) fail "$1 must be one line" ;;
    esac
}

require RABBITMQ_ADMIN_USER
require RABBITMQ_ADMIN_PASSWORD
require UPLINE_API_AMQP_PASSWORD
require UPLINE_WORKER_AMQP_PASSWORD
require UPLINE_NOTIFIER_AMQP_PASSWORD
require UPLINE_WEBHOOKS_AMQP_PASSWORD
if [ -n "${UPLINE_PRODUCER_AMQP_USER-}" ] || [ -n "${UPLINE_PRODUCER_AMQP_PASSWORD-}" ]; then
    require UPLINE_PRODUCER_AMQP_USER
    require UPLINE_PRODUCER_AMQP_PASSWORD
fi

MANAGEMENT=${RABBITMQ_MANAGEMENT_URL:-http://127.0.0.1:15672}
MANAGEMENT=${MANAGEMENT%/}
VHOST=${RABBITMQ_VHOST:-/}
PREFIX=${UPLINE_AMQP_USER_PREFIX-upline-}
WAIT_SECS=${RABBITMQ_WAIT_SECS:-60}

# A path segment: every byte percent-encoded (vhost "/" is %2F).
urlencode() {
    printf '%s' "$1" | od -An -v -tx1 | tr -d ' \n' | sed 's/../%&/g'
}

# A JSON string's contents: backslashes and double quotes escaped.
json() {
    printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g'
}

# A value for a double-quoted curl config line: the same escaping.
quoted() {
    json "$1"
}

# request METHOD PATH [JSON]: prints the HTTP status (000: no answer); the response body goes
# to $body_file, curl's own error to $error_file. The admin credentials and the body (which
# may hold a password) reach curl through its config on standard input, so they never show
# in the process list.
request() {
    {
        printf 'user = "%s"\n' "$(quoted "$RABBITMQ_ADMIN_USER:$RABBITMQ_ADMIN_PASSWORD")"
        if [ $# -ge 3 ]; then
            printf 'data = "%s"\n' "$(quoted "$3")"
        fi
    } | curl --silent --show-error --max-time 30 --config - \
        --request "$1" --header 'content-type: application/json' \
        --output "$body_file" --write-out '%{http_code}' "$MANAGEMENT$2" 2>"$error_file" \
        || true
}

body_file=$(mktemp)
error_file=$(mktemp)
trap 'rm -f "$body_file" "$error_file"' EXIT

# call WHAT METHOD PATH [JSON]: fails unless the answer is 2xx; sets STATUS.
call() {
    what=$1
    shift
    STATUS=$(request "$@")
    case $STATUS in
        2??) ;;
        *) fail "$what: HTTP $STATUS from $MANAGEMENT: $(head -c 500 "$body_file")$(cat "$error_file")" ;;
    esac
}

# Waits for the management API (it starts a little after the broker answers pings).
deadline=$(($(date +%s) + WAIT_SECS))
while :; do
    STATUS=$(request GET /api/whoami)
    case $STATUS in
        200) break ;;
        401) fail "the management API refuses $RABBITMQ_ADMIN_USER's credentials" ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] \
        || fail "no answer from the management API at $MANAGEMENT after ${WAIT_SECS}s (HTTP $STATUS) $(cat "$error_file")"
    sleep 2
done

vhost_path=$(urlencode "$VHOST")
call "vhost $VHOST" PUT "/api/vhosts/$vhost_path"
echo "vhost '$VHOST': present"

# user NAME PASSWORD CONFIGURE WRITE READ
user() {
    name=$1
    name_path=$(urlencode "$name")
    call "user $name" PUT "/api/users/$name_path" \
        "{\"password\":\"$(json "$2")\",\"tags\":\"\"}"
    case $STATUS in
        201) echo "user '$name': created (password set, no management access)" ;;
        *) echo "user '$name': updated (password set, no management access)" ;;
    esac
    call "permissions of $name" PUT "/api/permissions/$vhost_path/$name_path" \
        "{\"configure\":\"$(json "$3")\",\"write\":\"$(json "$4")\",\"read\":\"$(json "$5")\"}"
    echo "  permissions on '$VHOST': configure '$3'  write '$4'  read '$5'"
}

PUBLISH_PURCHASES='^upline\.purchases$'
WORKER_OWNS='^upline\.(purchases|purchases\.dlx|purchases\.dead|earnings)$'

user "${PREFIX}api" "$UPLINE_API_AMQP_PASSWORD" '^$' "$PUBLISH_PURCHASES" '^$'
user "${PREFIX}worker" "$UPLINE_WORKER_AMQP_PASSWORD" \
    "$WORKER_OWNS" "$WORKER_OWNS" '^upline\.purchases(\.dlx)?$'
user "${PREFIX}notifier" "$UPLINE_NOTIFIER_AMQP_PASSWORD" \
    '^amq\.gen-.*$' '^amq\.gen-.*$' '^(amq\.gen-.*|upline\.earnings)$'
WEBHOOK_QUEUES='^upline\.webhooks\.(earnings|purchases)$'
user "${PREFIX}webhooks" "$UPLINE_WEBHOOKS_AMQP_PASSWORD" "$WEBHOOK_QUEUES" "$WEBHOOK_QUEUES" \
    '^(upline\.webhooks\.(earnings|purchases)|upline\.earnings|upline\.purchases)$'
if [ -n "${UPLINE_PRODUCER_AMQP_USER-}" ]; then
    user "$UPLINE_PRODUCER_AMQP_USER" "$UPLINE_PRODUCER_AMQP_PASSWORD" \
        '^$' "$PUBLISH_PURCHASES" '^$'
fi
echo "rabbitmq-users: done"
