// A webhook receiver as a user writes one, verifying each delivery with the npm
// `standardwebhooks` library (the Standard Webhooks reference implementation), driven by
// tests/it/webhooks.rs.
//
//   node webhook-receiver.mjs <port> <fail_first>
//
// - POST /hook: a delivery. Verified against every secret set so far; one that verifies with
//   none is answered 401 and counted as invalid. The first <fail_first> attempts of each
//   `webhook-id` are answered 500, later ones 204 and recorded.
// - PUT /secrets: the secrets to verify with, a JSON array of `whsec_…` strings.
// - GET /state: `{attempts: {id: n}, received: [{id, type, data, verified_with}], invalid}`.
//
// Prints `listening <port>` once it accepts connections.
import http from 'node:http';
import { Webhook } from 'standardwebhooks';

const [portArg, failFirstArg] = process.argv.slice(2);
const failFirst = Number(failFirstArg ?? 0);
let secrets = [];
const attempts = {};
const received = [];
let invalid = 0;

const body = (req) => new Promise((resolve, reject) => {
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
  req.on('error', reject);
});

const server = http.createServer(async (req, res) => {
  const text = await body(req);
  if (req.method === 'PUT' && req.url === '/secrets') {
    secrets = JSON.parse(text);
    res.writeHead(204).end();
    return;
  }
  if (req.method === 'GET' && req.url === '/state') {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ attempts, received, invalid }));
    return;
  }
  if (req.method !== 'POST' || req.url !== '/hook') {
    res.writeHead(404).end();
    return;
  }
  const headers = {
    'webhook-id': req.headers['webhook-id'],
    'webhook-timestamp': req.headers['webhook-timestamp'],
    'webhook-signature': req.headers['webhook-signature'],
  };
  const verifiedWith = [];
  let payload;
  secrets.forEach((secret, i) => {
    try {
      payload = new Webhook(secret).verify(text, headers);
      verifiedWith.push(i);
    } catch {
      // not signed with this secret
    }
  });
  if (verifiedWith.length === 0) {
    invalid += 1;
    res.writeHead(401).end('signature does not verify');
    return;
  }
  const id = headers['webhook-id'];
  attempts[id] = (attempts[id] ?? 0) + 1;
  if (attempts[id] <= failFirst) {
    res.writeHead(500).end(`failing attempt ${attempts[id]} on purpose`);
    return;
  }
  received.push({ id, type: payload.type, data: payload.data, verified_with: verifiedWith });
  res.writeHead(204).end();
});

server.listen(Number(portArg), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
