-- Per-table autovacuum settings for the tables the pipeline churns (issue 11), so that a
-- production server with PostgreSQL's default settings stays flat under load.
--
-- The default triggers a vacuum once 20 % of a table is dead. A queue table (insert, then
-- delete once done) holds a few hundred live rows and piles up dead ones far faster than that:
-- it is vacuumed after a fixed number of dead rows instead, and without cost-based sleeping.
alter table earning_outbox set (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);
alter table commission_holds set (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);
-- Every batch updates its earners' rows (seq, totals, balances) and their per-level and
-- per-referral aggregates: the hottest rows are rewritten thousands of times a minute. Vacuum
-- them after 1 % of the table (plus 1000 rows) is dead rather than 20 %, and leave room in each
-- page for the next versions of its rows (new pages only; a VACUUM FULL applies it to all).
alter table users set (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000
);
alter table earner_levels set (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000
);
alter table earner_referrals set (
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000
);
