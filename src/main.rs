//! `upline`: runs the whole pipeline in one process (`upline run`) and carries the operator's
//! commands (`upline migrate`, `upline dlq`). See `upline --help`.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    upline::cli::main(upline::cli::Cli::parse()).await
}
