-- The outbox relay no longer holds a transaction open while it waits for RabbitMQ's publisher
-- confirms. A broker under a memory or disk alarm blocks publishers for as long as the alarm
-- lasts; a transaction kept open across that wait held the rows' locks and the xmin horizon,
-- so autovacuum could clean nothing anywhere and the hot tables bloated.
--
-- Instead a relay leases rows: one short statement stamps up to a batch of unleased (or
-- expired) rows with its own name and an expiry, and commits at once; the relay publishes
-- and awaits the confirms with no transaction open, then deletes the confirmed rows in a
-- second short transaction. A relay that dies, or whose confirms time out, leaves its lease
-- to expire, and any relay takes the rows over (at least once; the notifier drops duplicates
-- by seq).
--
-- Both columns are nullable without a default, so adding them rewrites nothing, and neither
-- is indexed, so stamping a lease is a HOT update.
alter table earning_outbox
    add column claimed_until timestamptz,
    add column claimed_by text;
