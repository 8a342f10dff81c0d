-- Safe to deploy: revocable tokens, erasure of personal data, leaderboard privacy, and a
-- retention limit on raw producer bodies (README "Security").

-- A user token carries the version it was issued at; bumping it (deactivation, erasure,
-- revoke) invalidates every earlier token of the user at once.
alter table users add column token_version bigint not null default 0;
-- The user may hide from the public leaderboard.
alter table users add column show_on_leaderboard boolean not null default true;
-- Set when the user's personal data was erased: name replaced by a label, email and
-- referral code removed. Earnings and totals stay, so the ledger remains exact.
alter table users add column erased_at timestamptz;
alter table users alter column email drop not null;
alter table users alter column referral_code drop not null;

drop index users_leaderboard_idx;
create index users_leaderboard_idx on users (total_earnings desc, id)
    where total_earnings > 0 and show_on_leaderboard;

-- Raw message bodies are dropped after privacy.raw_body_retention; the fingerprint stays, so
-- the idempotency check is unchanged.
alter table purchases alter column body drop not null;
alter table purchase_conflicts alter column body drop not null;
create index purchases_body_retention_idx on purchases (processed_at) where body is not null;
create index purchase_conflicts_body_retention_idx on purchase_conflicts (received_at)
    where body is not null;
