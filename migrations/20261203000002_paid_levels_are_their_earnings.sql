-- A level paid in full is its earning (issue 11).
--
-- Until now every level of every processed purchase had a `purchase_levels` row, two a
-- purchase, although a paid level repeats its commission earning: earner, rate and amount.
-- Those rows were the most expensive write of the ledger after the earnings themselves
-- (docs/perf.md). From now on the ledger writes `purchase_levels` rows only for the levels
-- that are not `paid`: no referrer, below the threshold, an inactive earner, a cap reached, or
-- a commission cut to what was left under the cap (`capped`, which keeps its earning id).
--
-- `purchase_level_outcomes` is what readers use: the stored exceptions, and a `paid` level for
-- every commission earning without one. Rows written before this migration (paid levels
-- included) read the same through it.
create view purchase_level_outcomes as
select purchase_id, level, earner_id, outcome, rate, amount, earning_id
from purchase_levels
union all
select e.purchase_id, e.level, e.earner_id, 'paid'::text, e.rate, e.amount, e.id
from earnings e
where e.kind = 'commission'
  and not exists (
      select 1 from purchase_levels l where l.purchase_id = e.purchase_id and l.level = e.level
  );

comment on view purchase_level_outcomes is
    'Every level of every processed purchase: purchase_levels holds the levels that were not paid in full; a paid level is its commission earning.';
comment on table purchase_levels is
    'The levels of processed purchases that were not paid in full (outcome other than paid); read purchase_level_outcomes for all levels.';
