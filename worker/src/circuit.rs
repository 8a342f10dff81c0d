//! The circuit between the consumers and the database: while the database fails with an
//! infrastructure error (outage, failover, timeouts, a schema not migrated yet), the circuit
//! is open, the worker reports not ready on `/readyz`, and only one consumer at a time tries
//! the database with its batch in hand; the others wait, taking nothing new from the queue.
//! The first success closes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{Mutex, MutexGuard};

/// Shared by the consumers of one worker process.
#[derive(Debug)]
pub struct Circuit {
    /// `true` while closed: the flag `/readyz` reads (`Probes::database_writable`).
    closed: Arc<AtomicBool>,
    probe: Mutex<()>,
}

impl Circuit {
    /// A closed circuit reporting its state through `closed`.
    pub fn new(closed: Arc<AtomicBool>) -> Self {
        closed.store(true, Ordering::Relaxed);
        Circuit {
            closed,
            probe: Mutex::new(()),
        }
    }

    /// Waits until this consumer may try the database: at once while closed; while open, when
    /// no other consumer is trying. Hold the guard for the attempt.
    pub async fn pass(&self) -> Option<MutexGuard<'_, ()>> {
        if self.closed.load(Ordering::Relaxed) {
            return None;
        }
        let guard = self.probe.lock().await;
        // Another consumer may have closed it meanwhile: then no need to go one at a time.
        (!self.closed.load(Ordering::Relaxed)).then_some(guard)
    }

    /// The database failed with an infrastructure error.
    pub fn open(&self) {
        if self.closed.swap(false, Ordering::Relaxed) {
            tracing::warn!("database failing: consumers stopped, the worker reports not ready");
            metrics::counter!("upline_worker_circuit_opened_total").increment(1);
        }
        metrics::gauge!("upline_worker_circuit_open").set(1.0);
    }

    /// The database answered again.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::Relaxed) {
            tracing::info!("database back: consumers resume");
            metrics::gauge!("upline_worker_circuit_open").set(0.0);
        }
    }
}
