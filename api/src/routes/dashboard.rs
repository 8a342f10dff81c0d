//! The dashboard of SPEC §8: a static single page (HTML, CSS, vanilla JS and a vendored
//! Chart.js) compiled into the binary and served at `/` and `/assets/…`, plus
//! `/dashboard/config.json`, which tells the page where the notifier's WebSocket is.
//!
//! Nothing is fetched from another host: the page works offline. Every asset carries a strong
//! `ETag` computed at compile time, so browsers revalidate cheaply (`304 Not Modified`).

use std::net::SocketAddr;

use axum::extract::{Path, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::error::ApiError;
use crate::AppState;

/// What `GET /dashboard/config.json` answers: where the dashboard page finds the notifier.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DashboardConfig {
    /// `api.notifier_public_url` when set: the notifier's WebSocket URL as a browser reaches it;
    /// null otherwise.
    pub notifier_ws_url: Option<String>,
    /// The port of `notifier.bind`; without a public URL the page connects to
    /// `ws(s)://<the page's host>:<notifier_port>/ws`.
    pub notifier_port: u16,
}

impl DashboardConfig {
    pub fn new(notifier_public_url: &str, notifier_bind: SocketAddr) -> Self {
        let url = notifier_public_url.trim();
        DashboardConfig {
            notifier_ws_url: (!url.is_empty()).then(|| url.to_owned()),
            notifier_port: notifier_bind.port(),
        }
    }
}

/// One file compiled into the binary.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    cache_control: &'static str,
    body: &'static [u8],
    etag: u64,
}

/// FNV-1a, evaluated at compile time: the assets' `ETag`s.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

macro_rules! asset {
    ($path:literal, $content_type:literal, $cache:expr) => {{
        const BODY: &[u8] = include_bytes!(concat!("../../assets/", $path));
        Asset {
            path: $path,
            content_type: $content_type,
            cache_control: $cache,
            body: BODY,
            etag: fnv1a(BODY),
        }
    }};
}

/// Our own files change with each release: always revalidate (cheap with the `ETag`).
const REVALIDATE: &str = "no-cache";
/// The vendored library changes only when we upgrade it.
const VENDOR: &str = "public, max-age=86400";

const INDEX: Asset = asset!("index.html", "text/html; charset=utf-8", REVALIDATE);

const ASSETS: &[Asset] = &[
    asset!("app.js", "text/javascript; charset=utf-8", REVALIDATE),
    asset!("app.css", "text/css; charset=utf-8", REVALIDATE),
    asset!("favicon.svg", "image/svg+xml", REVALIDATE),
    asset!(
        "vendor/chart.umd.min.js",
        "text/javascript; charset=utf-8",
        VENDOR
    ),
    asset!(
        "vendor/chart.js.LICENSE.md",
        "text/plain; charset=utf-8",
        VENDOR
    ),
];

/// The page's Content-Security-Policy: scripts, styles and images only from this origin; the
/// WebSocket may be on another port or host (the notifier).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; \
                   form-action 'self'; frame-ancestors 'none'";

fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", asset.etag);
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(asset.cache_control),
    );
    headers.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("hex is a valid header value"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    (headers, asset.body).into_response()
}

#[utoipa::path(
    get,
    path = "/",
    operation_id = "dashboard",
    summary = "The dashboard page",
    tag = "dashboard",
    params(("If-None-Match" = Option<String>, Header, description = "An `ETag` from an earlier answer")),
    responses(
        (status = 200, description = "The dashboard page; it signs in with a token or key and follows earnings live",
            body = String, content_type = "text/html", headers(("ETag" = String))),
        (status = 304, description = "Not modified"),
    ),
    security(()),
)]
/// `GET /`: the dashboard page.
pub async fn index(request: HeaderMap) -> Response {
    let mut response = serve(&INDEX, &request);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

#[utoipa::path(
    get,
    path = "/assets/{path}",
    operation_id = "dashboard_asset",
    summary = "The dashboard's files",
    tag = "dashboard",
    params(
        ("path" = String, Path, description = "A file of the page, e.g. `app.js`, `app.css`, `vendor/chart.umd.min.js`"),
        ("If-None-Match" = Option<String>, Header, description = "An `ETag` from an earlier answer"),
    ),
    responses(
        (status = 200, description = "The file, compiled into the binary", headers(("ETag" = String)),
            content((String = "text/javascript"), (String = "text/css"), (String = "image/svg+xml"), (String = "text/plain"))),
        (status = 304, description = "Not modified"),
        (status = 404, description = "`not_found`: no such file", body = upline_common::http::Problem, content_type = "application/problem+json"),
    ),
    security(()),
)]
/// `GET /assets/{*path}`: the page's scripts, styles and images.
pub async fn asset(Path(path): Path<String>, request: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.path == path) {
        Some(asset) => serve(asset, &request),
        None => ApiError::NotFound(format!("no asset {path:?}")).into_response(),
    }
}

#[utoipa::path(
    get,
    path = "/dashboard/config.json",
    operation_id = "dashboard_config",
    summary = "The dashboard's configuration",
    tag = "dashboard",
    responses((status = 200, description = "Where the page finds the notifier", body = DashboardConfig)),
    security(()),
)]
/// `GET /dashboard/config.json`: where the page finds the notifier.
pub async fn config(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(state.dashboard.as_ref().clone()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_prefers_the_public_url_and_always_gives_the_port() {
        let bind: SocketAddr = "0.0.0.0:8081".parse().unwrap();
        let c = DashboardConfig::new("", bind);
        assert_eq!((c.notifier_ws_url, c.notifier_port), (None, 8081));
        let c = DashboardConfig::new(" wss://live.example.com/ws ", bind);
        assert_eq!(
            c.notifier_ws_url.as_deref(),
            Some("wss://live.example.com/ws")
        );
    }

    #[test]
    fn every_asset_is_distinct_and_the_page_loads_only_local_files() {
        for (i, a) in ASSETS.iter().enumerate() {
            assert!(ASSETS[i + 1..].iter().all(|b| b.path != a.path));
            assert!(!a.body.is_empty(), "{} is empty", a.path);
        }
        let html = std::str::from_utf8(INDEX.body).unwrap();
        let references = ["src=\"", "href=\""]
            .into_iter()
            .flat_map(|attr| html.split(attr).skip(1));
        for reference in references {
            let target = reference.split('"').next().unwrap();
            assert!(
                target.starts_with("/assets/"),
                "index.html references {target}"
            );
            let path = target.trim_start_matches("/assets/");
            assert!(
                ASSETS.iter().any(|a| a.path == path),
                "index.html references {target}, which is not served"
            );
        }
    }
}
