// A tiny Socket.IO server, the peer of `tidings bench fanout --peer socketio`.
//
//   node server.js PORT [HOST]      (HOST defaults to 127.0.0.1)
//
// - Clients connect over WebSocket only (`/socket.io/?EIO=4&transport=websocket&channel=NAME`)
//   and join the room NAME.
// - `POST /pub/NAME` with a JSON body emits `message` with that body to the room and answers
//   201 (400 for a body that is not JSON, 413 over 1 MiB).
// - `GET /healthz` answers 200, so `tidings bench` can check the server is up.
'use strict';

const http = require('node:http');
const { Server } = require('socket.io');

const port = Number(process.argv[2] || process.env.PORT || 8090);
const host = process.argv[3] || process.env.HOST || '127.0.0.1';
const MAX_BODY = 1 << 20;

const httpServer = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/healthz') {
    res.writeHead(200, { 'content-type': 'text/plain' });
    res.end('ok\n');
    return;
  }
  const m = req.method === 'POST' && /^\/pub\/([^/?]+)$/.exec(req.url);
  if (!m) {
    // socket.io handles its own path before this listener runs.
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found\n');
    return;
  }
  const channel = decodeURIComponent(m[1]);
  const chunks = [];
  let size = 0;
  req.on('data', (chunk) => {
    size += chunk.length;
    if (size <= MAX_BODY) chunks.push(chunk);
  });
  req.on('end', () => {
    if (size > MAX_BODY) {
      res.writeHead(413);
      res.end();
      return;
    }
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch (e) {
      res.writeHead(400, { 'content-type': 'text/plain' });
      res.end(`body is not JSON: ${e.message}\n`);
      return;
    }
    io.to(channel).emit('message', body);
    res.writeHead(201);
    res.end();
  });
});

const io = new Server(httpServer, {
  transports: ['websocket'],
  serveClient: false,
  perMessageDeflate: false,
});

io.on('connection', (socket) => {
  const channel = socket.handshake.query.channel;
  if (typeof channel === 'string' && channel !== '') {
    socket.join(channel);
  } else {
    socket.disconnect(true);
  }
});

httpServer.listen(port, host, () => {
  console.log(`socket.io peer listening on http://${host}:${port} (pid ${process.pid})`);
});

for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    io.close();
    process.exit(0);
  });
}
