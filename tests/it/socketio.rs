//! Socket.IO (contract §5, "Socket.IO") with the stock npm `socket.io-client` 4.x, driven by
//! `tests/browser/socketio.mjs`: a user token opens the user's feed at connect; the admin key
//! opens one with `register`; a client without a valid token gets `error`, never data; a client
//! that reconnects with `auth.since` gets what it missed replayed, then live earnings, each
//! exactly once.

use std::time::Duration;

use crate::harness::{browser_test_dir, run_node_script, TestApp, ADMIN, PRODUCER};

#[tokio::test]
async fn a_stock_socket_io_client_registers_gets_new_earning_and_what_it_missed() {
    let dir = browser_test_dir().await;
    let app = TestApp::spawn().await;
    // C's purchases pay B at level 1.
    let (_, b, c) = app.chain_abc().await;
    run_node_script(
        &dir,
        "socketio.mjs",
        &[
            app.api.as_str(),
            app.notifier.as_str(),
            ADMIN,
            PRODUCER,
            b.token.as_str(),
            &b.id.to_string(),
            &c.id.to_string(),
        ],
        Duration::from_secs(120),
    )
    .await;
    app.stop().await;
}
