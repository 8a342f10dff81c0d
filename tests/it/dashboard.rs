//! The dashboard (SPEC §8): served by the api from the binary, no asset from another host, and
//! driven end to end in real headless Chromium by `tests/browser/dashboard.mjs` (sign in, live
//! earnings over the notifier, the pending/approved/paid/reversed counters, one bar per leg
//! stacked by level with level-2 earnings inside their leg, the feed by entry kind, a simulated
//! purchase, a dropped WebSocket, the admin's picker).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::harness::{browser_test_dir, run_node_script, TestApp, ADMIN, PRODUCER};

const CHROMIUM: &str = "/usr/bin/chromium";

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// `src="…"` and `href="…"` values of a page.
fn references(html: &str) -> Vec<&str> {
    ["src=\"", "href=\""]
        .into_iter()
        .flat_map(|attr| html.split(attr).skip(1))
        .filter_map(|rest| rest.split('"').next())
        .collect()
}

async fn check_page_and_assets(app: &TestApp) {
    let r = app.http.get(app.url("/")).send().await.expect("GET /");
    assert_eq!(r.status(), 200);
    assert!(
        header(&r, "content-type").starts_with("text/html"),
        "GET / content type {:?}",
        header(&r, "content-type")
    );
    assert!(header(&r, "content-security-policy").contains("default-src 'self'"));
    let html = r.text().await.expect("body");
    assert!(html.contains("<canvas id=\"chart-levels\""), "{html}");
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"),
        "the page references another host:\n{html}"
    );
    let refs = references(&html);
    assert!(refs.len() >= 4, "too few asset references: {refs:?}");
    for reference in refs {
        assert!(
            reference.starts_with('/') && !reference.starts_with("//"),
            "asset {reference:?} is not served by the api"
        );
        let r = app
            .http
            .get(app.url(reference))
            .send()
            .await
            .expect("asset");
        assert_eq!(r.status(), 200, "{reference}");
    }

    for (path, content_type) in [
        ("/assets/app.js", "text/javascript"),
        ("/assets/app.css", "text/css"),
        ("/assets/vendor/chart.umd.min.js", "text/javascript"),
        ("/assets/favicon.svg", "image/svg+xml"),
    ] {
        let r = app.http.get(app.url(path)).send().await.expect("asset");
        assert_eq!(r.status(), 200, "{path}");
        assert!(
            header(&r, "content-type").starts_with(content_type),
            "{path}: content type {:?}",
            header(&r, "content-type")
        );
        assert!(
            !header(&r, "cache-control").is_empty(),
            "{path}: no Cache-Control"
        );
        assert_eq!(header(&r, "x-content-type-options"), "nosniff");
        let etag = header(&r, "etag").to_owned();
        assert!(etag.starts_with('"'), "{path}: ETag {etag:?}");
        assert!(
            !r.bytes().await.expect("body").is_empty(),
            "{path} is empty"
        );
        // A browser revalidating its copy gets 304 without a body.
        let r = app
            .http
            .get(app.url(path))
            .header("if-none-match", &etag)
            .send()
            .await
            .expect("asset");
        assert_eq!(r.status(), 304, "{path} revalidated with {etag}");
    }
    let chart = app
        .http
        .get(app.url("/assets/vendor/chart.umd.min.js"))
        .send()
        .await
        .expect("chart.js")
        .text()
        .await
        .expect("body");
    assert!(chart.contains("Chart.js v4") && chart.contains("MIT License"));

    let r = app
        .http
        .get(app.url("/assets/../Cargo.toml"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 404);
    let r = app
        .http
        .get(app.url("/assets/nope.js"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 404);
    assert_eq!(header(&r, "content-type"), "application/problem+json");

    let r = app
        .http
        .get(app.url("/dashboard/config.json"))
        .send()
        .await
        .expect("config");
    assert_eq!(r.status(), 200);
    let config: Value = r.json().await.expect("json");
    assert_eq!(
        config["notifier_ws_url"].as_str(),
        Some(app.ws_url.as_str())
    );
    assert!(config["notifier_port"].is_u64(), "{config}");
}

#[tokio::test]
async fn the_dashboard_shows_earnings_live_in_a_real_browser() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "the dashboard test drives Chromium at {CHROMIUM}: `apt-get install -y chromium` \
         (bash .ci/run installs it)"
    );
    let dir = browser_test_dir().await;
    let app = TestApp::spawn().await;
    check_page_and_assets(&app).await;

    let (_, b, c) = app.chain_abc().await;
    // More of B's downline, so the tree, the legs and level 2 have something to show: C ← Esha,
    // B ← Dev ← Farid, and Gita under B, deactivated (red in the tree).
    app.register("Esha", Some(c.id)).await;
    let dev = app.register("Dev", Some(b.id)).await;
    app.register("Farid", Some(dev.id)).await;
    let gita = app.register("Gita", Some(b.id)).await;
    app.deactivate(gita.id).await;
    let screenshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png");
    run_node_script(
        &dir,
        "dashboard.mjs",
        &[
            app.api.as_str(),
            ADMIN,
            PRODUCER,
            b.token.as_str(),
            &b.id.to_string(),
            &c.id.to_string(),
            &screenshot.display().to_string(),
        ],
        Duration::from_secs(180),
    )
    .await;
    assert!(
        screenshot.is_file(),
        "no screenshot at {}",
        screenshot.display()
    );
    app.stop().await;
}

#[tokio::test]
async fn the_dashboard_renews_a_users_token_and_signs_out_when_it_is_revoked() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "the session test drives Chromium at {CHROMIUM}: `apt-get install -y chromium`"
    );
    let dir = browser_test_dir().await;
    let app = TestApp::spawn_with(Default::default(), |s| {
        s.auth.token_ttl = Duration::from_secs(8);
    })
    .await;
    let (_, b, c) = app.chain_abc().await;
    run_node_script(
        &dir,
        "session.mjs",
        &[
            app.api.as_str(),
            ADMIN,
            PRODUCER,
            &b.id.to_string(),
            &c.id.to_string(),
        ],
        Duration::from_secs(120),
    )
    .await;
    app.stop().await;
}
