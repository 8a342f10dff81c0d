-- Commissions with a lifecycle (docs/contract.md §10): refunds and clawbacks, a holding
-- period, payouts.
--
-- The ledger stays append-only: every change to an earner's money is a new `earnings` row with
-- the earner's next `seq`, and `kind` says which: a commission, a reversal (negative amount,
-- after a refund), an approval (the holding period ended: pending → approved) or a payout
-- (approved → paid). Rows are never updated or deleted.

-- Each earner's money by state; total_earnings = pending + approved + paid (net of reversals).
alter table users
    add column pending_earnings  numeric not null default 0,
    add column approved_earnings numeric not null default 0,
    add column paid_earnings     numeric not null default 0,
    add column reversed_earnings numeric not null default 0;
-- Commissions recorded before the lifecycle existed were final when credited: approved.
update users set approved_earnings = total_earnings where total_earnings <> 0;

alter table earnings
    add column kind text not null default 'commission'
        constraint earnings_kind_check check (kind in ('commission', 'reversal', 'approval', 'payout')),
    -- reversal, approval: the commission (earnings.id) it reverses or approves
    add column refers_to  bigint,
    -- reversal: the refund that caused it
    add column refund_id  text,
    -- payout: the payout batch
    add column payout_id  bigint,
    -- commission: held (pending) until then; null = approved when credited (commission.hold_days = 0,
    -- or credited before the lifecycle existed)
    add column hold_until timestamptz,
    -- a payout has no purchase, buyer, level or rate
    alter column source_user_id drop not null,
    alter column purchase_id drop not null,
    alter column level drop not null,
    alter column rate drop not null;
alter table earnings drop constraint earnings_purchase_level_key;
-- Exactly once, whatever the retries: one commission per (purchase, level), one reversal per
-- (commission, refund), one approval per commission, one payout entry per (batch, earner).
create unique index earnings_commission_key on earnings (purchase_id, level) where kind = 'commission';
create unique index earnings_reversal_key on earnings (refers_to, refund_id) where kind = 'reversal';
create unique index earnings_approval_key on earnings (refers_to) where kind = 'approval';
create unique index earnings_payout_key on earnings (payout_id, earner_id) where kind = 'payout';

-- Held commissions waiting for their approval, claimed by the workers' schedule with
-- `for update skip locked` and deleted as they are approved (or found fully reversed).
create table commission_holds (
    earning_id bigint      primary key references earnings (id),
    due_at     timestamptz not null
);
create index commission_holds_due_at_idx on commission_holds (due_at);

-- What has been refunded of each purchase, kept under the purchase row's lock.
alter table purchases add column refunded numeric not null default 0;

-- Every refund ever received; refund_id is its idempotency key.
create table refunds (
    refund_id   text        primary key,
    -- no foreign key: a refund may arrive before its purchase and wait for it
    purchase_id text        not null,
    -- as asked; null = everything still refundable
    requested   numeric,
    -- what it refunded, once applied
    amount      numeric,
    status      text        not null check (status in ('waiting', 'applied', 'rejected')),
    reason      text,
    -- canonical form of the request, to tell a retry from a conflicting reuse of the id
    fingerprint text        not null,
    received_at timestamptz not null default now(),
    applied_at  timestamptz
);
create index refunds_purchase_id_idx on refunds (purchase_id);
create index refunds_waiting_idx on refunds (purchase_id) where status = 'waiting';

-- Payout batches: the instruction a finance team executes; no money leaves the system.
create table payouts (
    id              bigint generated always as identity primary key,
    idempotency_key text        not null unique,
    -- canonical form of the request, to tell a retry from a conflicting reuse of the key
    fingerprint     text        not null,
    status          text        not null check (status in ('created', 'paid')),
    label           text,
    -- approved balances as of period_end (the batch's creation); period_start = the previous
    -- batch's period_end
    period_start    timestamptz,
    period_end      timestamptz not null,
    minimum         numeric     not null,
    currency        text        not null,
    total           numeric     not null,
    line_count      integer     not null,
    created_at      timestamptz not null default now(),
    paid_at         timestamptz
);

create table payout_lines (
    payout_id   bigint  not null references payouts (id),
    user_id     bigint  not null,
    amount      numeric not null,
    -- the earner's last seq when the batch was made: everything approved up to it is covered
    through_seq bigint  not null,
    primary key (payout_id, user_id)
);
create index payout_lines_user_id_idx on payout_lines (user_id);
