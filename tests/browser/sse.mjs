// A real browser's EventSource on the notifier's SSE feed (SPEC §5), driven by tests/it/sse_browser.rs.
//
//   node sse.mjs <page_url> <sse_url>
//
// Opens <page_url> in headless Chromium (it only sets the page's origin), creates
// `new EventSource(<sse_url>)` there and reports on stdout, one line each, until stdin closes or
// a `QUIT` line arrives:
//
//   READY                      the EventSource exists (not yet open)
//   OPEN {"readyState":1}      the stream is open (again)
//   ERROR {"readyState":0|2, "data":…}
//                              an `error` event: 0 = reconnecting by itself, 2 = given up;
//                              `data` is set only for a server-sent `event: error`
//   EARNING {"id":"3","seq":3,"purchase_id":"…","amount":"100.00",…}
//                              an `earning` event (`id` is the event's lastEventId)
//   CONSOLE …                  the page's console and uncaught errors
//   FAILED …                   the script itself failed (exit 1)
//   BYE                        the browser is closed (exit 0)
//
// The page never reconnects by hand: every reconnect is the EventSource's own, with
// `Last-Event-ID`.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const [pageUrl, sseUrl] = process.argv.slice(2);
if (!sseUrl) {
  console.error('usage: node sse.mjs <page_url> <sse_url>');
  process.exit(2);
}
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

const say = (kind, payload) => {
  process.stdout.write(payload === undefined ? `${kind}\n` : `${kind} ${JSON.stringify(payload)}\n`);
};

/** Resolves when stdin closes or says QUIT. */
const quit = new Promise((resolve) => {
  const rl = createInterface({ input: process.stdin });
  rl.on('line', (line) => { if (line.trim() === 'QUIT') resolve(); });
  rl.on('close', resolve);
});

async function main() {
  const profile = mkdtempSync(join(tmpdir(), 'upline-chromium-sse-'));
  let context;
  try {
    context = await chromium.launchPersistentContext(profile, {
      executablePath: CHROMIUM,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
        '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
    const page = context.pages()[0] || await context.newPage();
    page.on('console', (m) => say('CONSOLE', `${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => say('CONSOLE', `pageerror: ${e.message}`));
    // Calls from the page arrive here in the order the page made them.
    await page.exposeFunction('sseReport', (kind, payload) => say(kind, payload));
    await page.goto(pageUrl, { waitUntil: 'domcontentloaded' });
    await page.evaluate((url) => {
      const es = new EventSource(url);
      window.sse = es;
      es.addEventListener('open', () => window.sseReport('OPEN', { readyState: es.readyState }));
      es.addEventListener('error', (e) => window.sseReport('ERROR', {
        readyState: es.readyState,
        data: typeof e.data === 'string' ? e.data : null,
      }));
      es.addEventListener('earning', (e) => {
        let earning;
        try {
          earning = JSON.parse(e.data);
        } catch (err) {
          window.sseReport('EARNING', { id: e.lastEventId, unparsable: e.data });
          return;
        }
        window.sseReport('EARNING', {
          id: e.lastEventId,
          seq: earning.seq,
          purchase_id: earning.purchase_id,
          amount: earning.amount,
          earner_id: earning.earner_id,
          level: earning.level,
          origin: e.origin,
        });
      });
      // Anything the server sends without an event name would land here; it should not.
      es.addEventListener('message', (e) => window.sseReport('MESSAGE', { id: e.lastEventId, data: e.data }));
    }, sseUrl);
    say('READY');
    await quit;
    // Let reports already queued in the page reach us before the browser goes.
    await page.waitForTimeout(50);
  } finally {
    if (context) await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
}

main().then(() => {
  say('BYE');
  process.exit(0);
}).catch((e) => {
  say('FAILED', String(e && e.stack ? e.stack : e));
  process.exit(1);
});
