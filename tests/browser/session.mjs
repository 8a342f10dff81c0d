// A user's dashboard session in real headless Chromium: the page renews the user's token before
// it expires (auth.token_ttl), keeps its live feed across the old token's expiry, and goes back
// to sign-in, saying why, once the admin revokes the user's tokens.
//
//   node session.mjs <api_base_url> <admin_key> <producer_key> <user_id> <buyer_id>
//
// The api's tokens must be short-lived (auth.token_ttl a few seconds) and <buyer_id> a direct
// referral of the user, who has no earnings yet. The script issues the user's token with the
// admin key once the page is up, so a slow browser start does not use up its lifetime. Run by
// tests/it/dashboard.rs; exits 0 when every check passes.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const [api, adminKey, producerKey, userIdArg, buyerIdArg] = process.argv.slice(2);
if (!buyerIdArg) {
  console.error('usage: node session.mjs <api_base_url> <admin_key> <producer_key> <user_id> <buyer_id>');
  process.exit(2);
}
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TIMEOUT = 20000;
const log = (...a) => console.log('[session]', ...a);
const consoleLines = [];
let page;

async function until(description, fn, arg) {
  try {
    return await page.waitForFunction(fn, arg, { timeout: TIMEOUT, polling: 100 });
  } catch {
    const state = await page.evaluate(() => ({
      conn: document.getElementById('conn')?.dataset.state,
      connText: document.getElementById('conn-text')?.textContent,
      signinError: document.getElementById('signin-error')?.textContent,
      total: document.getElementById('total')?.dataset.value,
    })).catch((e) => String(e));
    throw new Error(`timed out waiting for ${description}; the page showed ${JSON.stringify(state)}`);
  }
}

async function main() {
  const profile = mkdtempSync(join(tmpdir(), 'upline-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    page = context.pages()[0] || await context.newPage();
    page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
    page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));

    log('sign in with a short-lived token');
    await page.goto(`${api}/`, { waitUntil: 'domcontentloaded' });
    await page.waitForSelector('#signin-view:not([hidden])', { timeout: TIMEOUT });
    const issued = await fetch(`${api}/api/users/${userIdArg}/token`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${adminKey}` },
    });
    if (issued.status !== 200) throw new Error(`issuing the user's token: HTTP ${issued.status}`);
    const userToken = (await issued.json()).token;
    await page.fill('#token', userToken);
    await page.click('#signin-submit');
    await until('the live feed', () => document.getElementById('conn').dataset.state === 'live');

    log('the page renews the token before it expires');
    await until('a renewed token', (first) => window.upline.token && window.upline.token !== first, userToken);
    const firstExpiry = JSON.parse(Buffer.from(userToken.split('.')[1], 'base64url').toString()).exp * 1000;
    const renewed = await page.evaluate(() => window.upline.token);
    if (await page.evaluate(() => sessionStorage.getItem('upline.token')) !== renewed) {
      throw new Error('the renewed token was not saved for reloads');
    }

    log('the feed is live again after the first token expired');
    await page.waitForTimeout(Math.max(0, firstExpiry - Date.now()) + 200);
    await until('the feed live after the first token expired',
      () => document.getElementById('conn').dataset.state === 'live');
    const r = await fetch(`${api}/api/purchases`, {
      method: 'POST',
      headers: { Authorization: `Bearer ${producerKey}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ purchase_id: 'session-1', buyer_id: Number(buyerIdArg), amount: '2000.00' }),
    });
    if (r.status !== 202) throw new Error(`POST /api/purchases: ${r.status} ${await r.text()}`);
    await until('the earning on the renewed session', () => document.getElementById('total').dataset.value === '100.00');

    log('the admin revokes the user\'s tokens: back to sign-in, saying why');
    const revoked = await fetch(`${api}/api/users/${userIdArg}/tokens`, {
      method: 'DELETE', headers: { Authorization: `Bearer ${adminKey}` },
    });
    if (revoked.status !== 204) throw new Error(`DELETE tokens: ${revoked.status} ${await revoked.text()}`);
    await until('the sign-in view with a reason', () => {
      const view = document.getElementById('signin-view');
      return !view.hidden && /ended/.test(document.getElementById('signin-error').textContent);
    });
    if (await page.evaluate(() => sessionStorage.getItem('upline.token')) !== null) {
      throw new Error('the revoked token is still saved');
    }
  } finally {
    await context.close().catch(() => {});
    rmSync(profile, { recursive: true, force: true });
  }
}

main().then(() => {
  log('all checks passed');
  process.exit(0);
}).catch((e) => {
  console.error('[session] FAILED:', e.message);
  if (consoleLines.length) console.error('[session] browser console:\n' + consoleLines.join('\n'));
  process.exit(1);
});
