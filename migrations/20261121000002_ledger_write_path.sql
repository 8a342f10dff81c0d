-- The ledger's write path, tuned under `upline bench drain`.
--
-- 1. Foreign keys from the ledger tables to users are dropped. Every check took a KEY SHARE
--    lock on the referenced user, and the referenced users are the busiest rows of all (the
--    earners at the top of the referral forest, locked by every batch): each check waited for
--    or piled onto another transaction's lock. The ledger writes only ids it has just read
--    (the earners it locked, the buyer it looked up), and users are never deleted, so the
--    references cannot dangle. Foreign keys to purchases stay: that row is the transaction's
--    own.
-- 2. Nothing reads earnings by (earner_id, source_user_id) any more (the by_referral report
--    reads earner_referrals), and every index costs each insert.
alter table earnings drop constraint earnings_earner_id_fkey;
alter table earnings drop constraint earnings_source_user_id_fkey;
alter table purchase_levels drop constraint purchase_levels_earner_id_fkey;
alter table earner_levels drop constraint earner_levels_user_id_fkey;
alter table earner_referrals drop constraint earner_referrals_user_id_fkey;
alter table earner_referrals drop constraint earner_referrals_source_user_id_fkey;
drop index if exists earnings_source_idx;
