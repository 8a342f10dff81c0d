//! SSE (SPEC §5) in a real browser: Chromium's own `EventSource`, driven by
//! `tests/browser/sse.mjs`, rides out a notifier restart. It reconnects by itself with
//! `Last-Event-ID`, gets the earnings credited while the notifier was down replayed from
//! PostgreSQL, then live ones, with no gap and no duplicate.

use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::harness::{browser_test_dir, free_port, TestApp};

const CHROMIUM: &str = "/usr/bin/chromium";
/// How long any one step may take.
const STEP: Duration = Duration::from_secs(15);

/// `tests/browser/sse.mjs` running in the background: its stdout lines, as they come.
struct Browser {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Every line so far, with the time since start, for failure reports.
    transcript: Vec<String>,
    /// The `earning` events received, in order.
    earnings: Vec<Value>,
    opens: usize,
    started: Instant,
}

impl Browser {
    async fn launch(dir: &Path, page_url: &str, sse_url: &str) -> Browser {
        let mut child = Command::new("node")
            .arg(dir.join("sse.mjs"))
            .args([page_url, sse_url])
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node runs");
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stdout.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .expect("stderr buffer")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Browser {
            child,
            stdin,
            lines,
            stderr,
            transcript: Vec::new(),
            earnings: Vec::new(),
            opens: 0,
            started: Instant::now(),
        }
    }

    /// What the browser reported so far.
    fn report(&self) -> String {
        format!(
            "the browser reported:\n  {}\nearnings seen: {}\nstderr:\n{}",
            self.transcript.join("\n  "),
            serde_json::to_string(&self.earnings).unwrap_or_default(),
            self.stderr.lock().expect("stderr buffer")
        )
    }

    /// Records a line; returns its kind and JSON payload.
    fn record(&mut self, line: &str) -> (String, Value) {
        self.transcript.push(format!(
            "{:>6} ms  {line}",
            self.started.elapsed().as_millis()
        ));
        let (kind, payload) = line.split_once(' ').unwrap_or((line, "null"));
        let payload: Value = serde_json::from_str(payload).unwrap_or(Value::Null);
        match kind {
            "EARNING" => self.earnings.push(payload.clone()),
            "OPEN" => self.opens += 1,
            "FAILED" => panic!("the browser script failed\n{}", self.report()),
            // readyState CLOSED: the EventSource will never reconnect by itself.
            "ERROR" if payload["readyState"] == 2 => panic!(
                "the EventSource gave up (readyState CLOSED) instead of reconnecting\n{}",
                self.report()
            ),
            _ => {}
        }
        (kind.to_owned(), payload)
    }

    /// Reads lines until one satisfies `want`; panics (showing everything the browser
    /// reported) if none does within [`STEP`].
    async fn until(&mut self, what: &str, mut want: impl FnMut(&str, &Value) -> bool) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    let (kind, payload) = self.record(&line);
                    if want(&kind, &payload) {
                        return;
                    }
                }
                Ok(None) => panic!(
                    "the browser script exited while waiting for {what}\n{}",
                    self.report()
                ),
                Err(_) => panic!(
                    "timed out after {STEP:?} waiting for {what}\n{}",
                    self.report()
                ),
            }
        }
    }

    async fn until_seq(&mut self, seq: i64) {
        self.until(&format!("the earning with seq {seq}"), |kind, v| {
            kind == "EARNING" && v["seq"].as_i64() == Some(seq)
        })
        .await;
    }

    /// Asks the script to close the browser and reads every remaining line.
    async fn quit(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            // The script may already have gone; its exit status tells.
            let _ = stdin.write_all(b"QUIT\n").await;
            drop(stdin);
        }
        let deadline = tokio::time::Instant::now() + STEP;
        while let Ok(Some(line)) = tokio::time::timeout_at(deadline, self.lines.recv()).await {
            self.record(&line);
        }
        let status = tokio::time::timeout_at(deadline, self.child.wait()).await;
        match status {
            Ok(Ok(s)) if s.success() => {}
            other => panic!(
                "the browser script did not exit cleanly ({other:?})\n{}",
                self.report()
            ),
        }
    }
}

/// An earning as the browser saw it: seq, event id, purchase id, amount.
type Seen = (Option<i64>, String, Option<String>, Option<String>);

async fn stop_notifier(task: tokio::task::JoinHandle<anyhow::Result<()>>, browser: &Browser) {
    match tokio::time::timeout(STEP, task).await {
        Ok(joined) => joined
            .expect("notifier task did not panic")
            .expect("notifier stopped cleanly"),
        Err(_) => panic!(
            "the notifier did not stop within {STEP:?} with a browser attached\n{}",
            browser.report()
        ),
    }
}

#[tokio::test]
async fn a_browser_event_source_resumes_after_a_notifier_restart() {
    assert!(
        Path::new(CHROMIUM).exists(),
        "the SSE browser test drives Chromium at {CHROMIUM}: `apt-get install -y chromium`"
    );
    let dir = browser_test_dir().await;
    let app = TestApp::spawn().await;
    let (_, b, c) = app.chain_abc().await;

    let addr = format!("127.0.0.1:{}", free_port());
    let stop = CancellationToken::new();
    let (base, task) = app.spawn_stoppable_notifier(&addr, stop.clone()).await;
    let sse_url = format!("{base}/events/{}?token={}", b.id, b.token);
    // The page only gives the EventSource an origin, the api's (another port than the
    // notifier's, so CORS applies). Not the dashboard at `/`: its CSP (`connect-src 'self' ws:
    // wss:`) forbids http(s) connections to the notifier.
    let page_url = app.url("/healthz");
    let mut browser = Browser::launch(&dir, &page_url, &sse_url).await;
    browser.until("READY", |kind, _| kind == "READY").await;
    // Without Last-Event-ID the feed starts from "now": wait until it is open.
    browser
        .until("the EventSource to open", |kind, _| kind == "OPEN")
        .await;

    // 1. Live.
    app.purchase("sse-b-1", c.id, "2000.00").await;
    browser.until_seq(1).await;

    // 2. The notifier goes away; the browser notices and keeps trying (readyState CONNECTING:
    // `record` fails the test on CLOSED).
    stop.cancel();
    stop_notifier(task, &browser).await;
    browser
        .until(
            "the EventSource's error event after the notifier stopped",
            |kind, _| kind == "ERROR",
        )
        .await;

    // 3. Earnings credited while no notifier runs.
    // One after the other: `seq` is commit order, and workers may take concurrent purchases
    // in either order.
    app.purchase("sse-b-2", c.id, "2000.00").await;
    app.wait_processed("sse-b-2").await;
    app.purchase("sse-b-3", c.id, "2000.00").await;
    app.wait_processed("sse-b-3").await;
    // At least one reconnect attempt is refused (nothing listens); the browser keeps trying.
    browser
        .until(
            "a refused reconnect attempt while no notifier runs",
            |kind, _| kind == "ERROR",
        )
        .await;

    // 4. A new notifier on the same address: the browser comes back by itself and gets the
    // missed earnings replayed from PostgreSQL (it sends Last-Event-ID: 1).
    let stop = CancellationToken::new();
    let (base2, task) = app.spawn_stoppable_notifier(&addr, stop.clone()).await;
    assert_eq!(base2, base);
    let back = Instant::now();
    browser
        .until(
            "the EventSource to reopen on the new notifier",
            |kind, _| kind == "OPEN",
        )
        .await;
    let reconnect = back.elapsed();
    browser.until_seq(3).await;

    // 5. Live again.
    app.purchase("sse-b-4", c.id, "2000.00").await;
    browser.until_seq(4).await;
    // Give a stray duplicate a moment to show, then close the browser and read everything.
    tokio::time::sleep(Duration::from_millis(300)).await;
    browser.quit().await;
    println!(
        "reconnected {} ms after the new notifier was ready\n{}",
        reconnect.as_millis(),
        browser.report()
    );

    let seen: Vec<Seen> = browser
        .earnings
        .iter()
        .map(|e| {
            (
                e["seq"].as_i64(),
                e["id"].as_str().unwrap_or_default().to_owned(),
                e["purchase_id"].as_str().map(str::to_owned),
                e["amount"].as_str().map(str::to_owned),
            )
        })
        .collect();
    let expected: Vec<Seen> = (1..=4)
        .map(|n| {
            (
                Some(n),
                n.to_string(),
                Some(format!("sse-b-{n}")),
                Some("100.00".to_owned()),
            )
        })
        .collect();
    assert_eq!(
        seen,
        expected,
        "the browser should see seqs 1..=4 once each, in order (id = seq)\n{}",
        browser.report()
    );
    for e in &browser.earnings {
        assert_eq!(e["earner_id"].as_i64(), Some(b.id), "{e}");
        assert_eq!(e["level"].as_i64(), Some(1), "{e}");
    }
    assert_eq!(
        browser.opens,
        2,
        "one open per notifier, no reconnect besides the restart\n{}",
        browser.report()
    );
    assert!(
        !browser
            .transcript
            .iter()
            .any(|l| l.contains(" MESSAGE ") || l.contains("\"data\":\"")),
        "the browser got an unnamed message or a server-sent error event\n{}",
        browser.report()
    );

    stop.cancel();
    stop_notifier(task, &browser).await;
    app.stop().await;
}
