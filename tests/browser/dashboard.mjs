// End-to-end test of the dashboard (SPEC §8) in real headless Chromium.
//
//   node dashboard.mjs <api_base_url> <admin_key> <producer_key> <user_token> <user_id> <buyer_id> <screenshot_path>
//
// The user must have no earnings yet and <buyer_id> must be one of their direct referrals (the
// chain A ← B ← C of tests/it: user B, buyer C). Run by tests/it/dashboard.rs; exits 0 when every
// check passes, else prints what the page showed and exits 1.
import { mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { chromium } from 'playwright-core';
import { pipeline } from './pipeline.mjs';

const [api, adminKey, producerKey, userToken, userIdArg, buyerIdArg, screenshot] = process.argv.slice(2);
if (!screenshot) {
  console.error('usage: node dashboard.mjs <api_base_url> <admin_key> <producer_key> <user_token> <user_id> <buyer_id> <screenshot_path>');
  process.exit(2);
}
const userId = Number(userIdArg);
const buyerId = Number(buyerIdArg);
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TIMEOUT = 20000;
// Optional: a directory for extra screenshots (sign-in, phone width, admin picker) when styling.
const EXTRA_SHOTS = process.env.DASHBOARD_EXTRA_SHOTS;
const extraShot = async (name) => {
  if (EXTRA_SHOTS) await page.screenshot({ path: join(EXTRA_SHOTS, `${name}.png`), fullPage: true });
};

const log = (...a) => console.log('[dashboard]', ...a);
const consoleLines = [];
let page;

function check(cond, message) {
  if (!cond) throw new Error(message);
}

/** What the page shows right now, for failure reports. */
async function snapshot() {
  if (!page) return {};
  return page.evaluate(() => {
    const text = (id) => document.getElementById(id)?.textContent ?? null;
    const chart = (id) => {
      const c = window.Chart && window.Chart.getChart(document.getElementById(id));
      return c ? { labels: c.data.labels, datasets: c.data.datasets.map((d) => ({ label: d.label, data: d.data })) } : null;
    };
    return {
      url: location.href,
      conn: document.getElementById('conn')?.dataset.state,
      connText: text('conn-text'),
      banner: text('banner'),
      signinError: text('signin-error'),
      total: document.getElementById('total')?.dataset.value,
      level1: document.getElementById('level-1')?.dataset.value,
      level2: document.getElementById('level-2')?.dataset.value,
      states: Object.fromEntries(['pending', 'approved', 'paid', 'reversed']
        .map((s) => [s, document.getElementById(`state-${s}`)?.dataset.value])),
      feed: [...document.querySelectorAll('#feed li')].map((li) => li.textContent),
      purchaseResult: text('purchase-result'),
      doughnut: chart('chart-levels'),
      legs: chart('chart-legs'),
      lastSeq: window.upline?.lastSeq,
    };
  }).catch((e) => ({ error: String(e) }));
}

/** Polls `fn` in the page until it returns a truthy value. */
async function until(description, fn, arg) {
  try {
    return await page.waitForFunction(fn, arg, { timeout: TIMEOUT, polling: 100 });
  } catch (e) {
    throw new Error(`timed out waiting for ${description}`);
  }
}

const chartData = (id) => page.evaluate((canvasId) => {
  const c = window.Chart.getChart(document.getElementById(canvasId));
  return c && { labels: [...c.data.labels], datasets: c.data.datasets.map((d) => ({ label: d.label, data: [...d.data] })) };
}, id);

/** Waits until the legs chart shows `want` ({"<leg id>": {"<level>": "<amount>"}}) and no other bar. */
async function untilLegs(description, want) {
  return until(description, (legs) => {
    const c = window.Chart.getChart(document.getElementById('chart-legs'));
    if (!c || c.data.labels.length !== Object.keys(legs).length) return false;
    return Object.entries(legs).every(([id, byLevel]) => {
      const i = c.data.labels.findIndex((l) => l.endsWith(`#${id}`));
      return i >= 0 && Object.entries(byLevel).every(([level, amount]) => {
        const ds = c.data.datasets.find((d) => d.label === `Level ${level}`);
        const [int, frac = ''] = amount.split('.');
        return ds && Math.round(ds.data[i] * 100) === Number(int) * 100 + Number(frac.padEnd(2, '0'));
      });
    });
  }, want);
}

const toPaise = (s) => { const [i, f = ''] = s.split('.'); return Number(i) * 100 + Number(f.padEnd(2, '0')); };
const paiseToString = (p) => `${Math.floor(p / 100)}.${String(p % 100).padStart(2, '0')}`;

async function adminGet(path) {
  const r = await fetch(`${api}${path}`, { headers: { Authorization: `Bearer ${adminKey}` } });
  const body = await r.text();
  check(r.status === 200, `GET ${path}: ${r.status} ${body}`);
  return JSON.parse(body);
}

const rest = pipeline({ api, adminKey, producerKey, timeout: TIMEOUT });
const { waitProcessed } = rest;

/** A purchase straight through the REST API (as the producer), as another system would. */
const postPurchase = (purchaseId, amount, buyer = buyerId) => rest.postPurchase(purchaseId, amount, buyer);

async function signIn(token) {
  await page.fill('#token', token);
  await page.click('#signin-submit');
}

async function main() {
  const profile = mkdtempSync(join(tmpdir(), 'upline-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    viewport: { width: 1360, height: 900 },
    deviceScaleFactor: 1,
  });
  const offsite = [];
  try {
    page = context.pages()[0] || await context.newPage();
    page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
    page.on('request', (r) => {
      const u = new URL(r.url());
      if (!['ws:', 'wss:', 'data:'].includes(u.protocol) && u.origin !== new URL(api).origin) offsite.push(r.url());
    });

    // 1. Sign in as the user.
    log('open', api);
    await page.goto(`${api}/`, { waitUntil: 'domcontentloaded' });
    await page.waitForSelector('#signin-view:not([hidden])', { timeout: TIMEOUT });
    await extraShot('signin');
    await signIn(userToken);
    await until('the dashboard panels', () => {
      const ok = (id) => { const el = document.getElementById(id); return el && el.offsetParent !== null; };
      return ok('dashboard-view') && document.getElementById('total').dataset.value !== ''
        && ok('level-1') && ok('tree') && window.Chart.getChart(document.getElementById('chart-levels'));
    });
    await until('the live connection', () => document.getElementById('conn').dataset.state === 'live');
    const before = await page.$eval('#total', (el) => el.dataset.value);
    log('signed in; total', before);
    check(before === '0.00', `expected a fresh user with total 0.00, saw ${before}`);
    const statesBefore = await page.$$eval('.counter-state .counter-value', (els) => els.map((el) => [el.id, el.dataset.value]));
    check(JSON.stringify(statesBefore) === JSON.stringify([['state-pending', '0.00'], ['state-approved', '0.00'], ['state-paid', '0.00'], ['state-reversed', '0.00']]),
      `the state counters of a fresh user: ${JSON.stringify(statesBefore)}`);
    check(await page.$(`#tree [data-user-id="${buyerId}"].active`), 'the buyer is not shown as an active referral in the tree');
    const doughnutBefore = await chartData('chart-levels');
    const barsBefore = await chartData('chart-legs');
    check(barsBefore.labels.length === 0, `a fresh user has legs: ${JSON.stringify(barsBefore)}`);

    // 2. Simulate a purchase through the form (producer key), without reloading.
    await page.selectOption('#buyer', String(buyerId));
    await page.fill('#amount', '2000.00');
    await page.fill('#producer-key', producerKey);
    await page.click('#purchase-submit');
    await until('the purchase to be accepted', () => /Accepted as|processed/.test(document.getElementById('purchase-result').textContent));
    // The commission is held (commission.hold_days): pending, from the event's totals.
    await until('the commission of 100.00 in the counters (pending) and the feed', () => {
      const v = (id) => document.getElementById(id)?.dataset.value;
      const first = document.querySelector('#feed li');
      return v('total') === '100.00' && v('level-1') === '100.00' && v('level-2') === '0.00'
        && v('state-pending') === '100.00' && v('state-approved') === '0.00' && v('state-paid') === '0.00'
        && v('state-reversed') === '0.00'
        && first && first.dataset.amount === '100.00' && first.textContent.includes('100.00')
        && first.dataset.kind === 'commission' && first.textContent.includes('commission');
    });
    const doughnut = await chartData('chart-levels');
    check(JSON.stringify(doughnut.datasets[0].data) !== JSON.stringify(doughnutBefore.datasets[0].data),
      `the doughnut did not change: ${JSON.stringify(doughnut)}`);
    check(doughnut.datasets[0].data[0] === 100, `doughnut level 1 is ${doughnut.datasets[0].data[0]}, expected 100`);
    await untilLegs(`one leg, the buyer #${buyerId}, with 100.00 at level 1`, { [buyerId]: { 1: '100.00', 2: '0.00' } });
    await until('the outcome of the purchase', () => /processed: level 1 paid/.test(document.getElementById('purchase-result').textContent));
    log('the earning arrived live: counters (pending), feed, doughnut and legs updated');

    // How the feed shows each kind of ledger entry (contract §10): a reversal negative, an
    // approval and a payout as moves between states.
    const shown = await page.evaluate((buyer) => {
      const base = { earner_id: window.upline.user.id, currency: 'INR', created_at: new Date().toISOString(), totals: { total: '0.00' } };
      const item = (e) => {
        const li = window.upline.render.feedItem({ ...base, ...e }, false);
        return { kind: li.dataset.kind, className: li.className, amount: li.querySelector('.feed-amount').textContent, text: li.textContent };
      };
      return [
        item({ earning_id: 91, seq: 91, kind: 'reversal', source_user_id: buyer, purchase_id: 'p-1', level: 1, rate: '0.05', amount: '-50.00', refers_to: 7, refund_id: 'rf-1' }),
        item({ earning_id: 92, seq: 92, kind: 'approval', source_user_id: buyer, purchase_id: 'p-1', level: 1, rate: '0.05', amount: '50.00', refers_to: 7 }),
        item({ earning_id: 93, seq: 93, kind: 'payout', amount: '250.00', payout_id: 4 }),
      ];
    }, buyerId);
    check(shown[0].kind === 'reversal' && shown[0].className === 'feed-reversal' && shown[0].amount === '−₹50.00'
      && shown[0].text.includes('commission #7') && shown[0].text.includes('refund rf-1'), `a reversal shows as ${JSON.stringify(shown[0])}`);
    check(shown[1].kind === 'approval' && shown[1].amount === '₹50.00' && shown[1].text.includes('pending → approved'),
      `an approval shows as ${JSON.stringify(shown[1])}`);
    check(shown[2].kind === 'payout' && shown[2].amount === '₹250.00' && shown[2].text.includes('approved → paid')
      && !shown[2].text.includes('undefined'), `a payout shows as ${JSON.stringify(shown[2])}`);

    // 3. Errors from the API are shown: a wrong producer key gets its problem+json detail.
    await page.fill('#producer-key', 'not-the-producer-key');
    await page.click('#purchase-submit');
    await until('the error detail of a refused purchase', () => {
      const el = document.getElementById('purchase-result');
      return el.classList.contains('fail') && el.textContent.length > 10 && !/Accepted/.test(el.textContent);
    });
    log('refused purchase shows:', await page.$eval('#purchase-result', (el) => el.textContent));
    await page.fill('#producer-key', producerKey);

    // 4. The WebSocket drops; an earning credited while it is down arrives after the reconnect.
    await page.evaluate(() => window.upline.socket.close());
    await until('the page to notice the drop', () => document.getElementById('conn').dataset.state === 'reconnecting');
    await postPurchase('browser-after-drop', '3000.00');
    await waitProcessed('browser-after-drop');
    await until('the reconnect', () => document.getElementById('conn').dataset.state === 'live');
    await until('the earning credited while disconnected (total 250.00)', () => {
      const v = (id) => document.getElementById(id)?.dataset.value;
      return v('total') === '250.00' && v('level-1') === '250.00'
        && document.querySelector('#feed li')?.dataset.purchaseId === 'browser-after-drop';
    });
    // …and a purchase after the reconnect arrives live, with nothing doubled.
    await postPurchase('browser-after-reconnect', '1000.01');
    await until('a live earning after the reconnect (total 300.00)', () => document.getElementById('total').dataset.value === '300.00'
      && document.querySelector('#feed li')?.dataset.purchaseId === 'browser-after-reconnect');
    const feedSeqs = await page.$$eval('#feed li', (lis) => lis.map((li) => Number(li.dataset.seq)));
    check(JSON.stringify(feedSeqs) === JSON.stringify([3, 2, 1]), `feed seqs ${JSON.stringify(feedSeqs)}, expected [3,2,1]`);
    check(await page.$eval('#state-pending', (el) => el.dataset.value) === '300.00', 'pending after the reconnect is not 300.00');
    await untilLegs('the leg of the buyer at 300.00 after the reconnect', { [buyerId]: { 1: '300.00', 2: '0.00' } });
    log('reconnected after a drop; nothing missed, nothing doubled');

    // 5. A reload stays signed in (sessionStorage) and shows the same totals from the API.
    await page.reload({ waitUntil: 'domcontentloaded' });
    await until('the dashboard after a reload', () => document.getElementById('total')?.dataset.value === '300.00'
      && document.querySelectorAll('#feed li').length === 3);
    await until('the live connection after a reload', () => document.getElementById('conn').dataset.state === 'live');

    // 6. Purchases by the rest of the downline (other legs, level 2, an inactive buyer): the live
    // page ends up with exactly the totals the API reports, one bar per leg; a level-2 buyer's
    // earning is inside its leg (the bar of the direct referral above them), not a bar of its own.
    const refs = await adminGet(`/api/users/${userId}/referrals`);
    const others = [...refs.level_1, ...refs.level_2].filter((r) => r.id !== buyerId);
    const amounts = ['4200.00', '12000.00', '8000.00', '1500.00', '2600.00', '3100.00'];
    for (const [i, r] of others.entries()) {
      await postPurchase(`browser-extra-${r.id}`, amounts[i % amounts.length], r.id);
    }
    for (const r of others) await waitProcessed(`browser-extra-${r.id}`);
    const report = await adminGet(`/api/users/${userId}/earnings`);
    await until('the totals the API reports', (want) => {
      const v = (id) => document.getElementById(id)?.dataset.value;
      return v('total') === want.total && Object.entries(want.by_level).every(([l, t]) => v(`level-${l}`) === t)
        && ['pending', 'approved', 'paid', 'reversed'].every((s) => v(`state-${s}`) === want[s]);
    }, report);
    check(report.pending === report.total, `everything is still held: ${JSON.stringify(report)}`);
    check(report.by_leg.every((leg) => refs.level_1.some((r) => r.id === leg.leg_user_id)),
      `a leg that is no direct referral: ${JSON.stringify(report.by_leg)}`);
    await untilLegs('one bar per leg, as by_leg reports', Object.fromEntries(report.by_leg.map((leg) => [leg.leg_user_id, leg.by_level])));
    const legsAll = await chartData('chart-legs');
    const level2Buyers = report.by_referral.filter((row) => row.level === 2);
    check(level2Buyers.length >= 2, `expected level-2 earnings: ${JSON.stringify(report.by_referral)}`);
    for (const row of level2Buyers) {
      check(!legsAll.labels.some((l) => l.endsWith(`#${row.source_user_id}`)),
        `the level-2 buyer #${row.source_user_id} has a bar of its own: ${JSON.stringify(legsAll)}`);
      const leg = refs.level_2.find((r) => r.id === row.source_user_id).referrer_id;
      const i = legsAll.labels.findIndex((l) => l.endsWith(`#${leg}`));
      const level2 = legsAll.datasets.find((d) => d.label === 'Level 2');
      check(i >= 0 && Math.round(level2.data[i] * 100) === toPaise(row.total),
        `the level-2 earning of #${row.source_user_id} (${row.total}) is not in the leg of #${leg}: ${JSON.stringify(legsAll)}`);
    }
    check(await page.$$eval('#tree .tree-node.inactive', (n) => n.length) === refs.level_1.concat(refs.level_2).filter((r) => !r.is_active).length,
      'inactive referrals are not all shown red');
    log(`downline purchases arrived: total ${report.total}, by level ${JSON.stringify(report.by_level)}, ${report.by_leg.length} legs`);

    // 7. The shop refunds a third of an earlier purchase over REST (contract §10): a reversal
    // of 50.00 arrives live, negative in the feed, out of pending, into reversed, and the leg
    // shrinks by as much.
    const refund = await fetch(`${api}/api/purchases/browser-after-drop/refunds`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${producerKey}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ refund_id: 'browser-rf-1', amount: '1000.00' }),
    });
    check(refund.status === 202, `POST refund: ${refund.status} ${await refund.text()}`);
    await until('the reversal in the feed and the counters', (before) => {
      const v = (id) => document.getElementById(id)?.dataset.value;
      const first = document.querySelector('#feed li');
      const paise = (x) => Math.round(Number(x) * 100);
      return first && first.dataset.kind === 'reversal' && first.dataset.amount === '-50.00'
        && v('state-reversed') === '50.00' && paise(v('total')) === paise(before.total) - 5000
        && paise(v('state-pending')) === paise(before.pending) - 5000;
    }, report);
    const afterRefund = await adminGet(`/api/users/${userId}/earnings`);
    await untilLegs('the legs net of the reversal', Object.fromEntries(afterRefund.by_leg.map((leg) => [leg.leg_user_id, leg.by_level])));
    log(`a refund arrived live as a reversal: total ${afterRefund.total}, reversed ${afterRefund.reversed}`);

    mkdirSync(dirname(screenshot), { recursive: true });
    await page.waitForTimeout(1300); // let the highlight animations finish
    await page.screenshot({ path: screenshot, fullPage: true });
    log('screenshot written to', screenshot);
    if (EXTRA_SHOTS) {
      await page.setViewportSize({ width: 390, height: 844 });
      await page.waitForTimeout(500);
      await extraShot('phone');
      await page.setViewportSize({ width: 1360, height: 900 });
    }

    // 8. Sign out; sign in as admin, pick the user, see the same dashboard.
    await page.click('#sign-out');
    await page.waitForSelector('#signin-view:not([hidden])', { timeout: TIMEOUT });
    check(await page.evaluate(() => sessionStorage.getItem('upline.token')) === null, 'the token is still stored after signing out');
    await signIn(adminKey);
    await until('the user picker', (id) => [...document.querySelectorAll('#user-select option')].some((o) => o.value === String(id)), userId);
    check(await page.isHidden('#dashboard-view'), 'the admin sees a dashboard before picking a user');
    await extraShot('admin-picker');
    await page.selectOption('#user-select', String(userId));
    await page.click('#user-show');
    await until('the picked user\'s dashboard', ([id, total]) => document.getElementById('total')?.dataset.value === total
      && window.upline.user?.id === id && document.querySelectorAll('#feed li').length > 3, [userId, afterRefund.total]);
    await until('the admin\'s live connection', () => document.getElementById('conn').dataset.state === 'live');
    // The admin's form sends with the admin key (no producer key field).
    check(await page.isHidden('#producer-key-row'), 'the admin is asked for a producer key');
    await page.selectOption('#buyer', String(buyerId));
    await page.fill('#amount', '2000.00');
    await page.click('#purchase-submit');
    const expected = paiseToString(toPaise(afterRefund.total) + 10000);
    await until(`a live earning on the admin view (total ${expected})`, (want) => document.getElementById('total').dataset.value === want, expected);
    log('admin view renders and updates live');

    check(offsite.length === 0, `requests to other hosts: ${offsite.join(', ')}`);
    const errors = consoleLines.filter((l) => l.startsWith('error') || l.startsWith('pageerror'))
      .filter((l) => !/403|Forbidden/.test(l)); // the refused purchase above logs its 403
    check(errors.length === 0, `console errors:\n${errors.join('\n')}`);
  } catch (e) {
    e.sawPage = await snapshot();
    throw e;
  } finally {
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
}

main().then(() => {
  log('all checks passed');
  process.exit(0);
}).catch((e) => {
  console.error('[dashboard] FAILED:', e.message);
  console.error('[dashboard] the page showed:', JSON.stringify(e.sawPage ?? {}, null, 2));
  if (consoleLines.length) console.error('[dashboard] browser console:\n' + consoleLines.join('\n'));
  process.exit(1);
});
