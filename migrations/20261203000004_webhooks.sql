-- Signed webhooks (contract §11): endpoints an admin registers, the messages they are sent,
-- one delivery per endpoint and message, and every attempt of each delivery.
--
-- Written by the webhooks service and the api's `/api/webhooks`; never by the ledger, so a
-- slow or dead endpoint cannot hold a lock the ledger needs.

create table webhook_endpoints (
    id bigint generated always as identity primary key,
    url text not null,
    description text not null default '',
    -- Event types the endpoint receives: `earning.created`, `purchase.processed`, …
    event_types text[] not null,
    -- The signing key, base64 (the API shows it as `whsec_` + this).
    secret text not null,
    -- The key before the last rotation, still signing until `previous_secret_expires_at`.
    previous_secret text,
    previous_secret_expires_at timestamptz,
    -- Set when the endpoint kept failing (or by hand); no new messages are queued for it and
    -- its pending deliveries wait until it is enabled again.
    disabled_at timestamptz,
    disabled_reason text,
    -- When its current run of failed attempts began; null after any success.
    failing_since timestamptz,
    created_at timestamptz not null default now(),
    check (cardinality(event_types) > 0)
);

-- One row per event, whatever the number of endpoints: `id` is the `webhook-id` header, stable
-- across retries and replays so that receivers can de-duplicate; `payload` is the exact body
-- that is signed and sent.
create table webhook_messages (
    id text primary key,
    event_type text not null,
    payload text not null,
    created_at timestamptz not null default now()
);
create index webhook_messages_created_at_idx on webhook_messages (created_at);

create table webhook_deliveries (
    id bigint generated always as identity primary key,
    endpoint_id bigint not null references webhook_endpoints on delete cascade,
    message_id text not null references webhook_messages on delete cascade,
    status text not null default 'pending' check (status in ('pending', 'delivered', 'failed')),
    -- Attempts made so far (a replay starts again from 0).
    attempts int not null default 0,
    -- When the next attempt is due (pending), or until when a dispatcher holds the delivery
    -- while it sends it; null once delivered or failed.
    next_attempt_at timestamptz default now(),
    -- When the current run of attempts began (the first attempt, or the first after a replay).
    started_at timestamptz,
    last_status_code int,
    last_error text,
    created_at timestamptz not null default now(),
    delivered_at timestamptz,
    unique (endpoint_id, message_id)
);
-- Due deliveries, looked up endpoint by endpoint so that each gets its share.
create index webhook_deliveries_due_idx on webhook_deliveries (endpoint_id, next_attempt_at)
    where status = 'pending';
create index webhook_deliveries_endpoint_idx on webhook_deliveries (endpoint_id, id);
create index webhook_deliveries_message_idx on webhook_deliveries (message_id);

create table webhook_attempts (
    id bigint generated always as identity primary key,
    delivery_id bigint not null references webhook_deliveries on delete cascade,
    attempted_at timestamptz not null default now(),
    -- The HTTP status, when the endpoint answered.
    status_code int,
    -- Why the attempt failed without an answer (timeout, refused, blocked address), or the
    -- start of a non-2xx answer's body.
    error text,
    duration_ms int not null
);
create index webhook_attempts_delivery_idx on webhook_attempts (delivery_id, id);

-- Pending deliveries are updated on every attempt: vacuum them early.
alter table webhook_deliveries set (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000
);
