-- The ledger's own references are checked by the transaction that writes them, not by
-- foreign keys (issue 11).
--
-- `pg_stat_statements` over a 200,000-purchase drain (docs/perf.md, "Fewer checks, bigger
-- batches") counted 1.47 million referential-integrity checks: one per earning to
-- its purchase, one per purchase level to its purchase, one per outbox row and one per held
-- commission to its earning. Each is a trigger that runs a query per inserted row. Every one
-- of them checks a row that the same transaction has just inserted (the purchase it claimed,
-- the earning it returned), and purchases and earnings are never deleted (retention clears a
-- purchase's body, not the row), so the references cannot dangle.
--
-- Foreign keys stay where a row refers to something another transaction wrote: purchase
-- conflicts and payout lines.
alter table earnings drop constraint earnings_purchase_id_fkey;
alter table purchase_levels drop constraint purchase_levels_purchase_id_fkey;
alter table earning_outbox drop constraint earning_outbox_earning_id_fkey;
alter table commission_holds drop constraint commission_holds_earning_id_fkey;
