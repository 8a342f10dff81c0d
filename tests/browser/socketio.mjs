// A stock socket.io-client 4.x (from npm) on the notifier's Socket.IO endpoint (contract §5,
// "Socket.IO"), driven by tests/it/socketio.rs: what a dashboard of the Node systems upline
// replaces does, unchanged.
//
//   node socketio.mjs <api_url> <notifier_url> <admin_key> <producer_key> <earner_token> <earner_id> <buyer_id>
//
// <buyer_id>'s purchases pay <earner_id> at level 1. Exits 0 when every step held, 1 with the
// reason otherwise; prints what it saw.
import { io } from 'socket.io-client';
import { pipeline } from './pipeline.mjs';

const [api, notifier, adminKey, producerKey, earnerToken, earnerIdArg, buyerIdArg] = process.argv.slice(2);
if (!buyerIdArg) {
  console.error('usage: node socketio.mjs <api_url> <notifier_url> <admin_key> <producer_key> <earner_token> <earner_id> <buyer_id>');
  process.exit(2);
}
const earnerId = Number(earnerIdArg);
const buyerId = Number(buyerIdArg);
const TIMEOUT = 15000;

const log = (...args) => console.log(new Date().toISOString().slice(11, 23), ...args);
const check = (ok, what) => { if (!ok) throw new Error(what); };
const sleep = (ms) => new Promise((res) => { setTimeout(res, ms); });

const { postPurchase, waitProcessed } = pipeline({ api, adminKey, producerKey, timeout: TIMEOUT });
const buy = (purchaseId, amount) => postPurchase(purchaseId, amount, buyerId);

/**
 * A client as a dashboard writes it: `auth` is a function, so every (re)connect sends the last
 * `seq` it holds as `since`. Records every `new_earning` and `error`.
 */
function client(name, token, { register, transports = ['websocket'] } = {}) {
  const seen = { earnings: [], errors: [], connects: 0, registered: [] };
  const socket = io(notifier, {
    transports,
    reconnection: false,
    auth: (cb) => {
      const last = seen.earnings.at(-1);
      cb(last ? { token, since: last.seq } : { token });
    },
  });
  const quiet = name.startsWith('many-');
  socket.on('connect', () => {
    seen.connects += 1;
    if (!quiet) log(`${name}: connected (${seen.connects})`);
    if (register !== undefined) socket.emit('register', register);
  });
  socket.on('connect_error', (e) => log(`${name}: connect_error ${e.message}`));
  socket.on('registered', (id) => { seen.registered.push(id); if (!quiet) log(`${name}: registered ${id}`); });
  socket.on('new_earning', (e) => { seen.earnings.push(e); log(`${name}: new_earning seq ${e.seq} ${e.purchase_id} ${e.amount}`); });
  socket.on('error', (e) => { seen.errors.push(e); log(`${name}: error ${JSON.stringify(e)}`); });
  return { socket, seen };
}

async function until(what, predicate) {
  const deadline = Date.now() + TIMEOUT;
  while (Date.now() < deadline) {
    if (predicate()) return;
    await sleep(20);
  }
  throw new Error(`timed out waiting for ${what}`);
}

const seqs = (c) => c.seen.earnings.map((e) => e.seq);

async function main() {
  // 1. The earner's own token in the handshake: the feed opens at connect; a purchase arrives
  // live as `new_earning`, the event of contract §4.
  const user = client('user', earnerToken);
  await until('the user connected', () => user.seen.connects === 1);
  await buy('sio-1', '2000.00');
  await until('seq 1', () => user.seen.earnings.length === 1);
  const first = user.seen.earnings[0];
  check(first.seq === 1 && first.earner_id === earnerId && first.source_user_id === buyerId
    && first.purchase_id === 'sio-1' && first.level === 1 && first.amount === '100.00',
  `first new_earning: ${JSON.stringify(first)}`);

  // 2. The admin key plus register(userId), as the legacy dashboards do, on the client's
  // default transports (long-polling first, then the upgrade to WebSocket); a client without a
  // token that registers gets an `error`, never data.
  const admin = client('admin', adminKey, { register: String(earnerId), transports: ['polling', 'websocket'] });
  await until('the admin registered', () => admin.seen.registered.length === 1);
  const stranger = client('stranger', undefined, { register: earnerId });
  await until('the stranger refused', () => stranger.seen.errors.length >= 1);
  check(stranger.seen.errors.every((e) => e.code === 'unauthorized'), `stranger errors: ${JSON.stringify(stranger.seen.errors)}`);

  // 3. The user goes away; two purchases are credited meanwhile; it reconnects (auth.since =
  // 1) and gets seq 2 and 3 replayed, then seq 4 live, each exactly once.
  user.socket.disconnect();
  await buy('sio-2', '3000.00');
  await buy('sio-3', '4000.00');
  await waitProcessed('sio-2');
  await waitProcessed('sio-3');
  user.socket.connect();
  await until('seq 2 and 3 replayed', () => user.seen.earnings.length === 3);
  await buy('sio-4', '5000.00');
  await until('seq 4 live', () => user.seen.earnings.length === 4);
  check(JSON.stringify(seqs(user)) === '[1,2,3,4]', `user seqs ${JSON.stringify(seqs(user))}`);
  // sio-2 and sio-3 may be credited in either order (several consumers record batches side by
  // side); seq follows the commits.
  const ids = user.seen.earnings.map((e) => e.purchase_id);
  check(ids[0] === 'sio-1' && ids[3] === 'sio-4' && JSON.stringify(ids.slice(1, 3).sort()) === '["sio-2","sio-3"]',
    `user purchases ${JSON.stringify(ids)}`);

  // The admin's feed opened after seq 1 and saw 2, 3, 4 live; the stranger saw nothing.
  await until('the admin saw seq 4', () => admin.seen.earnings.some((e) => e.seq === 4));
  check(JSON.stringify(seqs(admin)) === '[2,3,4]', `admin seqs ${JSON.stringify(seqs(admin))}`);
  await sleep(300);
  check(stranger.seen.earnings.length === 0, `the stranger got data: ${JSON.stringify(stranger.seen.earnings)}`);
  check(user.seen.errors.length === 0 && admin.seen.errors.length === 0,
    `unexpected errors: ${JSON.stringify([user.seen.errors, admin.seen.errors])}`);

  // A user token that registers someone else gets `error` and keeps its own feed.
  const nosy = client('nosy', earnerToken, { register: buyerId });
  await until('the nosy client refused', () => nosy.seen.errors.length === 1);
  check(nosy.seen.errors[0].code === 'unauthorized', `nosy error: ${JSON.stringify(nosy.seen.errors)}`);
  await buy('sio-5', '6000.00');
  await until('seq 5 on the nosy client', () => nosy.seen.earnings.some((e) => e.seq === 5));
  check(JSON.stringify(seqs(nosy)) === '[5]', `nosy seqs ${JSON.stringify(seqs(nosy))}`);

  for (const c of [user, admin, stranger, nosy]) c.socket.disconnect();

  // 4. Many legacy dashboards at once, each emitting register the moment it connects: every
  // one is registered. (A register that arrived before the server attached its handler used to
  // be lost; 300 did not show it, 3,000 did: docs/perf.md, "Socket.IO memory per connection".)
  const many = Array.from({ length: 300 }, (_, i) => client(`many-${i}`, adminKey, { register: earnerId }));
  await until('300 dashboards registered', () => many.every((c) => c.seen.registered.length === 1));
  for (const c of many) c.socket.disconnect();
  log('ok');
}

main().then(() => process.exit(0), (e) => {
  log(`FAILED ${e.stack || e}`);
  process.exit(1);
});
