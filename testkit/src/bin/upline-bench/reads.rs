//! Reads at scale: the earnings summary of a user with a million earnings, and the leaderboard
//! over a million users, through the api.

use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::stream::{self, StreamExt};
use secrecy::ExposeSecret;

use super::env::{seed_tree, Bench, BenchEnv};
use super::{progress, progress_done, Latency};

#[derive(Debug, clap::Args)]
pub struct ReadsArgs {
    /// Users (the leaderboard ranks them all).
    #[arg(long, default_value_t = 1_000_000)]
    users: i64,
    /// Earnings of the one heavy user whose summary is read.
    #[arg(long, default_value_t = 1_000_000)]
    earnings: i64,
    /// Requests per endpoint.
    #[arg(long, default_value_t = 2_000)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Also print EXPLAIN (ANALYZE, BUFFERS) of each query behind the two endpoints.
    #[arg(long)]
    explain: bool,
    #[arg(long)]
    keep: bool,
}

pub async fn run(bench: Bench<'_>, args: ReadsArgs) -> anyhow::Result<()> {
    let mut env = BenchEnv::new(bench, "reads", args.keep).await?;
    let result = scenario(&mut env, &args).await;
    env.finish().await;
    result
}

async fn timed(
    label: &str,
    f: impl std::future::Future<Output = sqlx::Result<()>>,
) -> anyhow::Result<()> {
    let t = Instant::now();
    progress(&format!("seeding: {label} …"));
    f.await?;
    progress(&format!(
        "seeding: {label} done in {:.1} s",
        t.elapsed().as_secs_f64()
    ));
    progress_done();
    Ok(())
}

async fn scenario(env: &mut BenchEnv, args: &ReadsArgs) -> anyhow::Result<()> {
    println!(
        "Reads at scale: {} users, one of them with {} earnings",
        args.users, args.earnings
    );
    let db = env.db.clone();
    let t = Instant::now();
    progress(&format!("seeding: {} users …", args.users));
    seed_tree(&db, args.users).await?;
    progress(&format!(
        "seeding: {} users done in {:.1} s",
        args.users,
        t.elapsed().as_secs_f64()
    ));
    progress_done();
    timed("leaderboard totals", async {
        sqlx::query(
            "update earner_balances set total_earnings = round((random() * 100000)::numeric, 2) where user_id > 1",
        )
        .execute(&db)
        .await?;
        Ok(())
    })
    .await?;
    let e = args.earnings;
    timed(&format!("{e} purchases"), async {
        sqlx::query(
            r#"insert into purchases (purchase_id, status, buyer_id, amount, currency, fingerprint, body, occurred_at)
               select 'seed-' || i, 'processed', (i % 8) + 2, 2000, 'INR', 'seed', '{}', now() from generate_series(1, $1::int8) i"#,
        )
        .bind(e)
        .execute(&db)
        .await?;
        Ok(())
    })
    .await?;
    timed(&format!("{e} earnings of user 1"), async {
        sqlx::query(
            r#"insert into earnings (earner_id, seq, source_user_id, purchase_id, level, rate, amount, currency, totals)
               select 1, i, (i % 8) + 2, 'seed-' || i, 1, 0.05, 100, 'INR',
                      jsonb_build_object('total', (i * 100) || '.00', 'level_1', (i * 100) || '.00', 'level_2', '0.00')
               from generate_series(1, $1::int8) i"#,
        )
        .bind(e)
        .execute(&db)
        .await?;
        sqlx::query("insert into earner_levels (user_id, level, total, count) values (1, 1, $1 * 100, $1)").bind(e).execute(&db).await?;
        sqlx::query(
            r#"insert into earner_referrals (user_id, source_user_id, level, total, count)
               select 1, (i % 8) + 2, 1, sum(100), count(*) from generate_series(1, $1::int8) i group by 2"#,
        )
        .bind(e)
        .execute(&db)
        .await?;
        sqlx::query("update earner_balances set earnings_seq = $1, total_earnings = $1 * 100 where user_id = 1").bind(e).execute(&db).await?;
        sqlx::query("vacuum analyze").execute(&db).await?;
        Ok(())
    })
    .await?;

    // What a worker does every `worker.leaderboard_refresh_ms` (no worker runs here), timed
    // at this size, once every balance is seeded.
    timed("leaderboard snapshot refresh", async {
        upline_worker::leaderboard::refresh(&db, Duration::ZERO).await?;
        Ok(())
    })
    .await?;
    env.start("api", &[]).await?;
    let api = env.service("api").expect("started").base.clone();
    let admin = env.settings.auth.admin_token.expose_secret().to_owned();
    let check: serde_json::Value = env
        .http
        .get(format!("{api}/api/users/1/earnings"))
        .bearer_auth(&admin)
        .send()
        .await?
        .json()
        .await?;
    let expected_total = format!("{}.00", e * 100);
    if check["total"] != expected_total.as_str()
        || check["recent"].as_array().map(Vec::len) != Some(20)
    {
        bail!(
            "the earnings summary is wrong: total {} (expected {expected_total})",
            check["total"]
        );
    }
    let board: serde_json::Value = env
        .http
        .get(format!("{api}/api/leaderboard?limit=10"))
        .send()
        .await?
        .json()
        .await?;
    let top: rust_decimal::Decimal =
        sqlx::query_scalar("select max(total_earnings) from earner_balances")
            .fetch_one(&db)
            .await?;
    let top = upline_common::money::Money::from_total(top).to_string();
    if board[0]["total_earnings"].as_str() != Some(top.as_str()) {
        bail!("the leaderboard is wrong: {} vs {top}", board[0]);
    }
    println!("  check passed: summary total {expected_total}, leaderboard top {top}");

    for (label, path, auth) in [
        (
            "earnings summary (1M earnings)",
            "/api/users/1/earnings".to_owned(),
            true,
        ),
        (
            "leaderboard top 10 (1M users)",
            "/api/leaderboard?limit=10".to_owned(),
            false,
        ),
    ] {
        // Warm up, then measure.
        for _ in 0..20 {
            env.http
                .get(format!("{api}{path}"))
                .bearer_auth(&admin)
                .send()
                .await?
                .bytes()
                .await?;
        }
        let started = Instant::now();
        let latencies: Vec<anyhow::Result<Duration>> = stream::iter(0..args.requests)
            .map(|_| {
                let (http, url, admin) = (env.http.clone(), format!("{api}{path}"), admin.clone());
                async move {
                    let t = Instant::now();
                    let mut req = http.get(url);
                    if auth {
                        req = req.bearer_auth(admin);
                    }
                    let r = req.send().await?;
                    if !r.status().is_success() {
                        bail!("{}", r.status());
                    }
                    r.bytes().await?;
                    Ok(t.elapsed())
                }
            })
            .buffer_unordered(args.concurrency)
            .collect()
            .await;
        let mut latency = Latency::new();
        for l in latencies {
            latency.record(l?);
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{label:<32} {} ; {:.0} requests/s at {} in flight",
            latency.summary(),
            args.requests as f64 / secs,
            args.concurrency
        );
    }

    if args.explain {
        for (label, sql) in [
            ("user", "select u.id, u.name, b.total_earnings from users u join earner_balances b on b.user_id = u.id where u.id = 1"),
            ("by_level", "select level, total, count from earner_levels where user_id = 1 order by level"),
            (
                "by_referral",
                "select r.source_user_id, u.name, r.level, r.total, r.count from earner_referrals r join users u on u.id = r.source_user_id where r.user_id = 1 order by r.total desc, r.source_user_id, r.level limit 100",
            ),
            ("recent", "select * from earnings where earner_id = 1 order by seq desc limit 20"),
            ("replay since seq", "select * from earnings where earner_id = 1 and seq > 999000 order by seq limit 500"),
            ("leaderboard", "select e.user_id, u.name, e.total_earnings from leaderboard_entries e join users u on u.id = e.user_id where u.show_on_leaderboard order by e.rank limit 10"),
            ("leaderboard snapshot refresh", "select refresh_leaderboard(100, interval '0')"),
        ] {
            let plan: Vec<String> = sqlx::query_scalar(&format!("explain (analyze, buffers) {sql}")).fetch_all(&db).await?;
            println!("\n-- {label}\n{sql};\n{}", plan.join("\n"));
        }
    }
    Ok(())
}
