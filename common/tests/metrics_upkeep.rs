//! The process's Prometheus recorder keeps every histogram sample (the value and when) until
//! it is folded into its summary, by a scrape of `/metrics` or by upkeep. A worker that
//! nobody scrapes records two samples a batch, so without upkeep its memory grew for as long as
//! it ran (docs/perf.md "Worker memory").
//!
//! This binary counts the bytes its allocations hold, so it has one test and no other work.

use std::alloc::System;
use std::time::{Duration, Instant};

use cap::Cap;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Bytes held by live allocations.
fn held() -> i64 {
    ALLOCATOR.allocated() as i64
}

#[test]
fn histogram_samples_are_let_go_without_a_scrape() {
    let _handle = upline_common::telemetry::metrics();
    let before = held();
    for i in 0..200_000u32 {
        metrics::histogram!("upline_upkeep_test_seconds").record(f64::from(i) / 1000.0);
    }
    let recorded = held() - before;
    // Held until upkeep folds them in: at least 16 bytes a sample.
    assert!(
        recorded > 3_200_000,
        "200,000 samples should be held until upkeep; {recorded} bytes held"
    );

    // Nobody scrapes, and recording goes on as in a worker (a sample every 250 ms). Upkeep
    // runs every 5 s; the blocks it drains are freed (crossbeam-epoch) at the upkeep after next,
    // once no thread can still be reading them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(250));
        metrics::histogram!("upline_upkeep_test_seconds").record(0.001);
        let now = held() - before;
        if now < recorded / 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{now} of the {recorded} bytes the samples took are still held 30 s later, with \
             nobody scraping: no upkeep"
        );
    }
}
