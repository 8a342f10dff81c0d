-- The public leaderboard is served from a snapshot of the top earners, so that the ledger's
-- balance updates can be HOT (issue 11; docs/perf.md, "The leaderboard from a snapshot").
--
-- Every ledger batch rewrites the `earner_balances` row of each earner it credits. The
-- leaderboard index covered `total_earnings`, which every such update changes, so none of them
-- could be a HOT update: each one wrote a new entry into both of the table's indexes, and the
-- dead versions stayed until a vacuum. Without that index the only one left is the key, which
-- never changes: an update finds room in its page (fillfactor 80) and writes no index entry,
-- and the page prunes its dead versions by itself.
--
-- The leaderboard then reads `leaderboard_entries`: the top earners (hidden users left out) as
-- of the last refresh, which the workers run every `worker.leaderboard_refresh_ms`
-- (docs/contract.md §6). The api joins it to `users` as it reads, so a user who hides or is
-- erased leaves the leaderboard at once, and names are current.
drop index earner_balances_leaderboard_idx;

create table leaderboard_entries (
    -- 1 = the largest total; ties by user id, as the leaderboard always ranked them
    rank           int         primary key,
    user_id        bigint      not null references users (id),
    total_earnings numeric     not null,
    refreshed_at   timestamptz not null
);

-- Rewrites `leaderboard_entries` with the `entries` top earners whose `show_on_leaderboard` is
-- set, unless another refresh is running or the last one is younger than `min_age`; returns
-- how many entries it wrote, or -1 when it skipped. Candidates come from `earner_balances`
-- alone (one top-N sort of the table), a few times `entries` of them so that users who hide
-- themselves leave room; only if so many of them hide that fewer than `entries` are left does
-- it look further.
create function refresh_leaderboard(entries int, min_age interval) returns int
language plpgsql as $$
declare
    margin     bigint := entries * 4;
    candidates bigint;
    written    int;
begin
    -- One refresh at a time: a worker that finds another one refreshing skips its turn.
    if not pg_try_advisory_xact_lock(hashtext('upline.refresh_leaderboard')) then
        return -1;
    end if;
    if exists (select 1 from leaderboard_entries where refreshed_at > now() - min_age) then
        return -1;
    end if;
    loop
        delete from leaderboard_entries;
        with c as (
            select b.user_id, b.total_earnings from earner_balances b
            where b.total_earnings > 0
            order by b.total_earnings desc, b.user_id limit margin
        ), ins as (
            insert into leaderboard_entries (rank, user_id, total_earnings, refreshed_at)
            select row_number() over (order by c.total_earnings desc, c.user_id),
                   c.user_id, c.total_earnings, now()
            from c join users u on u.id = c.user_id
            where u.show_on_leaderboard
            order by c.total_earnings desc, c.user_id
            limit entries
            returning 1
        )
        select (select count(*) from c), (select count(*) from ins)
        into candidates, written;
        exit when written >= entries or candidates < margin;
        margin := margin * 8;
    end loop;
    return written;
end
$$;

select refresh_leaderboard(100, interval '0');

comment on table leaderboard_entries is
    'The public leaderboard as of its last refresh (refresh_leaderboard): the top earners, hidden users left out.';
