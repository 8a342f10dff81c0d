-- The machine's ceiling for a ledger-shaped transaction (docs/perf.md, "Fewer checks, bigger
-- batches"): a plain set-based batch that inserts N purchases, credits each buyer's referrer and
-- that referrer's referrer, locks the earners in id order, numbers their earnings (`seq`) and
-- updates their totals. No idempotency check, no aggregates, no outbox, no lifecycle: what
-- PostgreSQL on this machine does with the least a ledger must write.
--
-- Everything lives in the schema `plain_ledger`, which the script drops and creates again. Run it
-- with pgbench against a scratch database:
--   createdb -h 127.0.0.1 -U postgres ceiling
--   psql -h 127.0.0.1 -U postgres -d ceiling -f testkit/sql/plain_ledger.sql
--   echo 'select plain_ledger.plain_batch(512);' > /tmp/b512.sql
--   pgbench -h 127.0.0.1 -U postgres -n -f /tmp/b512.sql -c 1 -j 1 -T 30 ceiling
-- purchases/s = tps × N. Drop the database afterwards.
drop schema if exists plain_ledger cascade;
create schema plain_ledger;
set search_path = plain_ledger;
create sequence pid;
create table users (id bigint primary key, referrer_id bigint, seq bigint not null default 0, total numeric not null default 0);
insert into users select i, case when i > 1 then greatest(1, (i / 3))::bigint end from generate_series(1, 10000) i;
create table purchases (purchase_id text primary key, buyer_id bigint not null, amount numeric not null, created_at timestamptz not null default now());
create table earnings (id bigint generated always as identity primary key, earner_id bigint not null, purchase_id text not null, level smallint not null, amount numeric not null, seq bigint not null, created_at timestamptz not null default now(), unique (purchase_id, level));
create index on earnings (earner_id, seq);
create function plain_batch(n int) returns void language plpgsql set search_path = plain_ledger as $$
declare pids text[]; buyers bigint[]; amounts numeric[];
        c_pid text[]; c_level int[]; c_earner bigint[]; c_amount numeric[];
begin
  select array_agg('p' || nextval('pid')), array_agg(2 + floor(random() * 9998)::bigint), array_agg(1500.00::numeric)
    into pids, buyers, amounts from generate_series(1, n);
  insert into purchases (purchase_id, buyer_id, amount) select * from unnest(pids, buyers, amounts);
  select array_agg(pid), array_agg(lvl), array_agg(earner), array_agg(amt)
    into c_pid, c_level, c_earner, c_amount from (
      select b.pid, 1 lvl, u.referrer_id earner, b.amount * 0.05 amt from unnest(pids, buyers, amounts) b(pid, buyer, amount) join users u on u.id = b.buyer where u.referrer_id is not null
      union all
      select b.pid, 2, u2.referrer_id, b.amount * 0.01 from unnest(pids, buyers, amounts) b(pid, buyer, amount) join users u on u.id = b.buyer join users u2 on u2.id = u.referrer_id where u2.referrer_id is not null) x;
  perform 1 from users where id = any(c_earner) order by id for no key update;
  insert into earnings (earner_id, purchase_id, level, amount, seq)
    select c.earner, c.pid, c.lvl, c.amt, u.seq + row_number() over (partition by c.earner order by c.pid, c.lvl)
    from unnest(c_pid, c_level, c_earner, c_amount) c(pid, lvl, earner, amt) join users u on u.id = c.earner;
  update users u set seq = u.seq + x.n, total = u.total + x.t
    from (select earner, count(*) n, sum(amt) t from unnest(c_earner, c_amount) c(earner, amt) group by earner) x where u.id = x.earner;
end $$;
