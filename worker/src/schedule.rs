//! The workers' schedule (docs/contract.md §10): every `worker.lifecycle_interval_secs`, each
//! worker approves the commissions whose holding period ended and applies the refunds that
//! were waiting for their purchase. Every worker runs it; held commissions are claimed with
//! `for update skip locked`, so each is approved by exactly one worker, and the work of many
//! workers adds up instead of colliding. The first run is at start-up, so whatever fell due
//! while no worker ran is caught up at once, a batch at a time.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ledger::lifecycle::{self, APPROVAL_BATCH};
use crate::process::Ctx;

/// A worker's periodic task's clock: a tick every `period`, the first at once, until `cancel`
/// fires. A tick that falls due while the last run is still going is delayed, not bunched.
pub(crate) struct Ticks {
    interval: tokio::time::Interval,
    cancel: CancellationToken,
}

impl Ticks {
    pub(crate) fn new(period: Duration, cancel: &CancellationToken) -> Ticks {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticks {
            interval,
            cancel: cancel.clone(),
        }
    }

    /// Waits for the next tick: `true` then, `false` once `cancel` fired.
    pub(crate) async fn next(&mut self) -> bool {
        tokio::select! {
            () = self.cancel.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}

/// What one run of the schedule did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Run {
    /// Commissions approved (an approval entry each).
    pub approved: usize,
    /// Parked refunds applied or rejected.
    pub refunds: usize,
}

/// Runs the schedule until `cancel` fires; database errors are logged and retried on the next
/// run.
pub async fn run(ctx: Ctx, every: Duration, cancel: CancellationToken) {
    let mut ticks = Ticks::new(every, &cancel);
    while ticks.next().await {
        match once(&ctx, &cancel).await {
            Ok(run) if run == Run::default() => {}
            Ok(run) => tracing::info!(
                approved = run.approved,
                refunds = run.refunds,
                "commission lifecycle: approved held commissions, applied parked refunds"
            ),
            Err(e) => tracing::warn!(error = %e, "commission lifecycle run failed; will retry"),
        }
    }
}

/// One run: approve everything due, a batch per transaction, then apply parked refunds whose
/// purchase is recorded.
///
/// # Errors
/// Database errors; what was committed before stays.
pub async fn once(ctx: &Ctx, cancel: &CancellationToken) -> sqlx::Result<Run> {
    let mut run = Run::default();
    loop {
        let (claimed, approved) = lifecycle::approve_due(&ctx.db, &ctx.rules).await?;
        run.approved += approved;
        if approved > 0 {
            metrics::counter!("upline_commissions_approved_total").increment(approved as u64);
            ctx.outbox_ready.notify_one();
        }
        if claimed < usize::try_from(APPROVAL_BATCH).unwrap_or(usize::MAX) || cancel.is_cancelled()
        {
            break;
        }
    }
    run.refunds = lifecycle::apply_waiting(&ctx.db, &ctx.rules, None).await?;
    if run.refunds > 0 {
        ctx.outbox_ready.notify_one();
    }
    Ok(run)
}
