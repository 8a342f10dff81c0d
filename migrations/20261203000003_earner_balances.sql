-- Each earner's running balances move out of `users` into a narrow table of their own
-- (issue 11; docs/perf.md, "Balances in a table of their own").
--
-- Every ledger batch rewrites the row of each earner it credits: the last `seq` and the money
-- by state. On `users` that row is wide (name, email, code, flags) and carries five indexes; the
-- leaderboard index covers `total_earnings`, so no such update is HOT and each one wrote a new
-- entry into all five. At 1,000,000 users that update was the ledger's most expensive
-- statement: about 60 ms of a 1,024-purchase batch. Here the row is seven numbers with two
-- indexes (the key and the leaderboard), and `users` is left to what changes rarely.
--
-- Every user has a row, opened when the user is inserted (the trigger below), so readers can
-- join on it and the ledger can lock it. Lock order is unchanged: earners in id order, now on
-- this table.
create table earner_balances (
    user_id           bigint  primary key references users (id),
    -- the last `seq` handed to this user's earnings (docs/contract.md §4): 1, 2, 3 … without gaps
    earnings_seq      bigint  not null default 0,
    -- pending + approved + paid, net of reversals (docs/contract.md §10)
    total_earnings    numeric not null default 0,
    pending_earnings  numeric not null default 0,
    approved_earnings numeric not null default 0,
    paid_earnings     numeric not null default 0,
    reversed_earnings numeric not null default 0
) with (
    -- the hottest rows of the pipeline: room in each page for their next versions, and a
    -- vacuum after 1 % of the table is dead (as for the other hot tables, migration 20261125000001)
    fillfactor = 80,
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_vacuum_threshold = 1000
);

insert into earner_balances (user_id, earnings_seq, total_earnings, pending_earnings,
                             approved_earnings, paid_earnings, reversed_earnings)
select id, earnings_seq, total_earnings, pending_earnings, approved_earnings, paid_earnings,
       reversed_earnings
from users;

-- The public leaderboard reads this index and skips the users who hide themselves.
create index earner_balances_leaderboard_idx on earner_balances (total_earnings desc, user_id)
    where total_earnings > 0;

-- Drops users_leaderboard_idx with them.
alter table users
    drop column earnings_seq,
    drop column total_earnings,
    drop column pending_earnings,
    drop column approved_earnings,
    drop column paid_earnings,
    drop column reversed_earnings;
-- What is left of `users` changes rarely (sign-ups, settings): back to the default page fill
-- and vacuum thresholds (migration 20261125000001 set them for the balances).
alter table users reset (fillfactor, autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold);

create function open_earner_balances() returns trigger language plpgsql as $$
begin
    insert into earner_balances (user_id) select id from new_users;
    return null;
end
$$;

-- Once per statement, so that a bulk insert of users opens their balances in one insert.
create trigger users_open_earner_balances
    after insert on users
    referencing new table as new_users
    for each statement execute function open_earner_balances();

comment on table earner_balances is
    'Each user''s last earning seq and money by state (total = pending + approved + paid); one row per user, opened when the user is inserted.';
