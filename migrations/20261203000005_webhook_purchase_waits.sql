-- Purchases whose copy reached the webhooks service (contract §11) but that no worker had
-- recorded after a few seconds: the copy is acknowledged and the purchase waits here, so that
-- a purchase that is never recorded (a message the workers dead-letter) cannot hold up the
-- others. Its `purchase.*` event is queued, and the row deleted, once a worker records it.
create table webhook_purchase_waits (
    purchase_id text primary key,
    received_at timestamptz not null default now()
);
create index webhook_purchase_waits_received_at_idx on webhook_purchase_waits (received_at);

-- Insert then delete: vacuum after a fixed number of dead rows.
alter table webhook_purchase_waits set (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);
