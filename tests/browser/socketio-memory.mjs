// A measurement, run by hand (docs/perf.md, "Socket.IO memory per connection"): opens <n>
// connections to a running notifier, either Socket.IO (socket.io-client, WebSocket transport,
// admin key + register) or the plain WebSocket of /ws (the `ws` package, admin key +
// subscribe), each following user 1 + (i mod <users>); prints `ready <n>` once every one is
// subscribed, then holds them until stdin closes. The caller reads the notifier's RSS before
// and after.
//
//   node socketio-memory.mjs <notifier_url> <admin_key> <n> <users> socketio|ws
import { createInterface } from 'node:readline';
import { io } from 'socket.io-client';
import WebSocket from 'ws';

const [notifier, adminKey, nArg, usersArg, mode] = process.argv.slice(2);
if (!mode) {
  console.error('usage: node socketio-memory.mjs <notifier_url> <admin_key> <n> <users> socketio|ws');
  process.exit(2);
}
const n = Number(nArg);
const users = Number(usersArg);

function socketio(user) {
  return new Promise((resolve, reject) => {
    const socket = io(notifier, { transports: ['websocket'], reconnection: false, auth: { token: adminKey } });
    socket.on('connect', () => socket.emit('register', user));
    socket.on('registered', () => resolve(socket));
    socket.on('error', (e) => reject(new Error(JSON.stringify(e))));
    socket.on('connect_error', reject);
  });
}

function ws(user) {
  return new Promise((resolve, reject) => {
    const socket = new WebSocket(`${notifier.replace(/^http/, 'ws')}/ws`);
    socket.on('open', () => socket.send(JSON.stringify({ type: 'subscribe', user_id: user, token: adminKey })));
    socket.on('message', (data) => {
      const m = JSON.parse(data.toString());
      if (m.type === 'subscribed') resolve(socket);
      else if (m.type === 'error') reject(new Error(data.toString()));
    });
    socket.on('error', reject);
  });
}

const open = mode === 'ws' ? ws : socketio;
const sockets = [];
for (let i = 0; i < n; i += 100) {
  const batch = [];
  for (let j = i; j < Math.min(n, i + 100); j += 1) batch.push(open(1 + (j % users)));
  sockets.push(...await Promise.all(batch));
}
console.log(`ready ${sockets.length}`);
await new Promise((resolve) => { createInterface({ input: process.stdin }).on('close', resolve); });
for (const s of sockets) (s.disconnect ? s.disconnect() : s.close());
process.exit(0);
