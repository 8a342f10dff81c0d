//! `upline`: runs the whole pipeline in one process (`upline run`) and carries the operator's
//! commands (`upline migrate`, `upline dlq`). See `upline --help`.

use clap::Parser;

/// mimalloc instead of the system allocator. Under a steady load, glibc's malloc let a
/// worker's resident memory creep up for as long as it ran (+6.5 MiB over a 30-minute soak)
/// while its live heap stayed flat at 9 MiB: freed memory was kept, fragmented, instead of
/// going back to the system. See docs/perf.md, "A 30-minute soak".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    upline::cli::main(upline::cli::Cli::parse()).await
}
