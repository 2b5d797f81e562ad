// SPDX-License-Identifier: MIT
//
// WebSocket peers for cport's WebSocket tests: the npm package ws (a strict,
// independent implementation of RFC 6455, pinned in tests/node; make test-deps
// installs it) as the client of a cport server, or as the reference server
// that tests/ws_probe.js and tests/ws_browser.js are checked against.
// Packets are cport's: {u16 size, u16 id} little-endian, size counting the
// 4-byte header. Started as
//
//   node ws_peer.js MODE URL [key=value ...]       (the client modes)
//   node ws_peer.js server PORT [key=value ...]    (the reference server)
//
// URL is ws://127.0.0.1:PORT/ or wss://127.0.0.1:PORT/; for wss, ca=FILE is
// the certificate the server's is verified against, for the name localhost
// (as tests/tls_peer.js). The client offers permessage-deflate (ws does by
// default) and no subprotocol; "UP" reports what the server accepted. Each
// mode prints what it saw on stdout, one line per fact, and exits 0 only
// when everything was as it should be; timeout=S (default 20) bounds a run.
//
// Client modes:
//   burst  packets=N (300) seed=S maxmsg=B (4096): N packets of random body
//          sizes 0..4000, as one byte stream cut into binary messages at
//          random points (1..B bytes, and some of 1..7 bytes and empty
//          ones), so that messages hold several packets and packets span
//          messages; some messages go as 2 or 3 fragments. The echoed
//          stream must come back byte-identical, in binary messages. Prints
//          "UP ext=<extensions> proto=<protocol>", then "OK <bytes>
//          <messages sent> <messages received> multi=<messages that held 2
//          or more whole packets> split=<messages that ended inside a
//          packet>", then closes with 1000 and prints "CLOSED <code>" (the
//          server's).
//   ping   pings with payloads of 0, 11 and 125 bytes, each answered by a
//          pong with its payload; then one packet's echo. Prints
//          "PONG <n>" per pong, "OK", "CLOSED <code>".
//   text   expect=C (1003): one text message; the server must close with
//          code C. Prints "CLOSED <code> <reason>".
//   big    size=B (66560) expect=C (1009): one binary message of B bytes
//          (whole cport packets, so a server that took it would echo it);
//          the server must close with C. Prints "CLOSED <code> <reason>".
//   close  the client closes with 1000 and a reason; the server must answer
//          with 1000. Prints "CLOSED <code>".
//   chat   clients=N (50) packets=M (20) size=S (64) [tcp=K tcp_port=P]: N
//          WebSocket clients (and K plain TCP clients on port P, the same
//          room) each send M chat packets (loadgen's layout: u16 size, u16 id
//          1, u32 sender, u32 seq, u64 time, then filler that depends on
//          sender and seq). Client 0 first sends sync packets (seq
//          0xffffffff) until every client got one, so that everyone is in
//          the room. Every client must get every packet of every sender
//          (itself included), each sender's in order. Prints "UP <clients>",
//          "SYNCED", then "CHAT <deliveries> <expected> <errors>".
//   load   conns=N (1): N connections, each echoing one packet of random
//          size at a time, checked, for as long as stdin stays open. As
//          tls_peer.js: "UP <i>" per connection, every 50 ms "COUNT <echoes>
//          <fewest echoes of one connection> <errors>", and when stdin ends,
//          each connection closes with 1000, then "DONE <echoes> <errors>".
//
// The reference server:
//   server PORT [max=B (65535)] [mode=echo|chat] [cert=FILE key=FILE]
//          [page=FILE]: ws's own server, configured as cport's WebSocket
//          server is: messages up to B bytes (1009 above), permessage-deflate
//          and subprotocols declined, request headers up to 8 KiB (431
//          above). echo sends each message back as it came (text as text:
//          ws accepts text, cport refuses it by default); chat sends each
//          message to every client. GET / without an upgrade answers with
//          FILE (tools/ws_chat.html), other plain requests with 404 (426
//          when they asked to upgrade to something). With cert and key it
//          speaks TLS (wss). PORT 0 takes a free port. Prints
//          "LISTENING <port>", and runs until killed (with stdin=1, until its
//          stdin ends).
'use strict';
const fs = require('fs');
const net = require('net');
const path = require('path');
const { createRequire } = require('module');
const { commandLine, rand, packet, echoLoad } = require('./peer_common');

function loadWs() {
  try {
    return createRequire(path.join(__dirname, 'node', 'package.json'))('ws');
  } catch (e) {
    console.log(`ERROR the npm package ws is not installed in tests/node (make test-deps runs npm ci there): ${e.message}`);
    process.exit(2);
  }
}
const WebSocket = loadWs();

const { args, opt, num } = commandLine(2);
const [mode, target] = args;

function fail(why) {
  console.log(`FAIL ${why}`);
  process.exit(1);
}

// A bound on every client run, so a silent server fails the run instead of
// hanging the test that started it.
function deadline() {
  setTimeout(() => fail(`timeout after ${num('timeout', 20)} s`), num('timeout', 20) * 1000).unref();
}

function open(onOpen) {
  const o = { perMessageDeflate: true };
  if (target.startsWith('wss:')) {
    if (!opt.ca) fail('wss needs ca=FILE');
    o.ca = fs.readFileSync(opt.ca);
    o.servername = 'localhost';
  }
  const ws = new WebSocket(target, o);
  ws.binaryType = 'nodebuffer';
  ws.on('open', () => onOpen(ws));
  ws.on('error', (e) => fail(`error ${e.message}`));
  return ws;
}

function printUp(ws) {
  console.log(`UP ext=${ws.extensions || '-'} proto=${ws.protocol || '-'}`);
}

// Sends data as one message, or as 2 or 3 fragments (ws sends a message's
// fragments with fin false, the last with fin true).
function sendMessage(ws, data, fragments) {
  if (fragments <= 1 || data.length < fragments) {
    ws.send(data, { binary: true });
    return;
  }
  let off = 0;
  for (let f = 1; f < fragments; f++) {
    const take = 1 + (rand() % (data.length - off - (fragments - f)));
    ws.send(data.subarray(off, off + take), { binary: true, fin: false });
    off += take;
  }
  ws.send(data.subarray(off), { binary: true, fin: true });
}

// The close that ends a run: prints the server's code and exits.
function closeAndExit(ws, ok) {
  ws.removeAllListeners('close');
  ws.on('close', (code) => {
    console.log(`CLOSED ${code}`);
    process.exit(ok && code === 1000 ? 0 : 1);
  });
  ws.close(1000, 'done');
}

function burst() {
  const n = num('packets', 300);
  const maxmsg = num('maxmsg', 4096);
  const parts = [];
  for (let i = 0; i < n; i++) parts.push(packet(i, rand() % 4001));
  const all = Buffer.concat(parts);
  const got = [];
  let len = 0;
  let sent = 0;
  let received = 0;
  // Where packets end in the stream, to count how the cuts fell.
  const ends = new Set();
  for (let i = 0, at = 0; i < n; i++) ends.add((at += parts[i].length));
  let multi = 0;
  let split = 0;
  const ws = open(() => {
    printUp(ws);
    for (let off = 0; off < all.length; ) {
      const r = rand() % 16;
      // Mostly long cuts, some tiny ones (inside a header), a few empty.
      const take = Math.min(all.length - off, r === 0 ? 0 : r < 4 ? 1 + (rand() % 7) : 1 + (rand() % maxmsg));
      sendMessage(ws, all.subarray(off, off + take), 1 + (rand() % 3 === 0 ? 1 + (rand() % 2) : 0));
      if (take > 0 && !ends.has(off + take)) split++;
      let whole = 0;
      for (let at = off, start = off; at < off + take; at++)
        if (ends.has(at + 1)) {
          if (start >= off && (start === 0 || ends.has(start))) whole++;
          start = at + 1;
        }
      if (whole >= 2) multi++;
      off += take;
      sent++;
    }
  });
  ws.on('message', (d, isBinary) => {
    if (!isBinary) fail('a text message came back');
    received++;
    got.push(d);
    len += d.length;
    if (len < all.length) return;
    const g = Buffer.concat(got);
    if (!g.equals(all)) {
      let i = 0;
      while (i < g.length && g[i] === all[i]) i++;
      fail(`MISMATCH at byte ${i} of ${all.length}, got ${g.length}`);
    }
    console.log(`OK ${all.length} ${sent} ${received} multi=${multi} split=${split}`);
    closeAndExit(ws, true);
  });
  ws.on('close', (code) => fail(`closed by the server with ${code} after ${len} of ${all.length} bytes`));
}

function ping() {
  const payloads = [Buffer.alloc(0), Buffer.from('cport-ping!'), Buffer.alloc(125, 0x5a)];
  const p = packet(7, 100);
  let pongs = 0;
  const ws = open(() => {
    printUp(ws);
    ws.ping(payloads[0]);
  });
  ws.on('pong', (d) => {
    if (!d.equals(payloads[pongs])) fail(`pong ${pongs} carries ${d.toString('hex')}`);
    console.log(`PONG ${d.length}`);
    if (++pongs < payloads.length) ws.ping(payloads[pongs]);
    else ws.send(p);
  });
  ws.on('message', (d) => {
    if (pongs < payloads.length || !d.equals(p)) fail('the echo came too early or differs');
    console.log('OK');
    closeAndExit(ws, true);
  });
  ws.on('close', (code) => fail(`closed by the server with ${code}`));
}

// One message the server must refuse: the close code is the result. A
// socket error (a reset while the message was still going out) is reported
// but not the end: the code tells whether the close frame arrived first
// (1006: it did not).
function refused(send, want) {
  const ws = open(() => {
    printUp(ws);
    send(ws);
  });
  ws.removeAllListeners('error');
  ws.on('error', (e) => console.log(`ERROR ${e.message}`));
  ws.on('message', (d) => fail(`the server answered with a message of ${d.length} bytes`));
  ws.on('close', (code, reason) => {
    console.log(`CLOSED ${code} ${reason.toString() || '-'}`);
    process.exit(code === want ? 0 : 1);
  });
}

function text() {
  refused((ws) => ws.send('hello, text', { binary: false }), num('expect', 1003));
}

function big() {
  const size = num('size', 66560);
  const parts = [];
  for (let left = size, id = 0; left > 0; id++) {
    const body = Math.min(left, 4004) - 4;
    if (body < 0) {
      parts.push(Buffer.alloc(left));
      break;
    }
    parts.push(packet(id, body));
    left -= body + 4;
  }
  refused((ws) => ws.send(Buffer.concat(parts), { binary: true }), num('expect', 1009));
}

function closeMode() {
  const ws = open(() => {
    printUp(ws);
    ws.close(1000, 'client says bye');
  });
  ws.on('close', (code) => {
    console.log(`CLOSED ${code}`);
    process.exit(code === 1000 ? 0 : 1);
  });
}

// ---------------------------------------------------------------- chat

const CHAT_ID = 1;
const CHAT_HDR = 20;
const SYNC_SEQ = 0xffffffff;

function chatPacket(sender, seq, size) {
  const b = Buffer.alloc(size);
  b.writeUInt16LE(size, 0);
  b.writeUInt16LE(CHAT_ID, 2);
  b.writeUInt32LE(sender, 4);
  b.writeUInt32LE(seq, 8);
  b.writeBigUInt64LE(process.hrtime.bigint(), 12);
  for (let i = CHAT_HDR; i < size; i++) b[i] = (sender * 131 + seq * 7 + i) & 0xff;
  return b;
}

function chatBodyOk(b, sender, seq) {
  for (let i = CHAT_HDR; i < b.length; i++) if (b[i] !== ((sender * 131 + seq * 7 + i) & 0xff)) return false;
  return true;
}

// Cuts a byte stream into packets, whatever the transport's pieces were.
function deframer(onPacket) {
  let carry = Buffer.alloc(0);
  return (d) => {
    let b = carry.length ? Buffer.concat([carry, d]) : d;
    while (b.length >= 4) {
      const size = b.readUInt16LE(0);
      if (size < 4) return onPacket(null);
      if (b.length < size) break;
      onPacket(b.subarray(0, size));
      b = b.subarray(size);
    }
    carry = Buffer.from(b);
  };
}

function chat() {
  const nws = num('clients', 50);
  const ntcp = num('tcp', 0);
  const n = nws + ntcp;
  const m = num('packets', 20);
  const size = num('size', 64);
  if (size < CHAT_HDR || size > 65535) fail('size must be 20..65535');
  const expected = n * n * m;
  const clients = [];
  let up = 0;
  let synced = 0;
  let deliveries = 0;
  let errors = 0;
  let sending = false;
  let syncTimer = null;
  const error = (why) => {
    if (errors++ < 10) console.log(`ERROR ${why}`);
  };
  const finishIfDone = () => {
    if (deliveries < expected) return;
    console.log(`CHAT ${deliveries} ${expected} ${errors}`);
    process.exit(errors ? 1 : 0);
  };
  const startSending = () => {
    sending = true;
    for (const c of clients) for (let s = 0; s < m; s++) c.send(chatPacket(c.idx, s, size));
  };
  const onPacket = (c, p) => {
    if (p === null || p.length !== size || p.readUInt16LE(2) !== CHAT_ID) return error(`client ${c.idx}: a bad packet`);
    const sender = p.readUInt32LE(4);
    const seq = p.readUInt32LE(8);
    if (sender >= n || !chatBodyOk(p, sender, seq)) return error(`client ${c.idx}: a corrupt packet`);
    if (seq === SYNC_SEQ) {
      if (!c.synced) {
        c.synced = true;
        if (++synced === n) {
          clearInterval(syncTimer);
          console.log('SYNCED');
          startSending();
        }
      }
      return;
    }
    if (!sending) return error(`client ${c.idx}: a packet before the start`);
    if (seq !== c.next[sender]) error(`client ${c.idx}: from ${sender} seq ${seq}, expected ${c.next[sender]}`);
    c.next[sender] = seq + 1;
    c.got++;
    deliveries++;
    finishIfDone();
  };
  const allUp = () => {
    console.log(`UP ${n}`);
    const sync = () => clients[0].send(chatPacket(0, SYNC_SEQ, size));
    sync();
    syncTimer = setInterval(sync, 100);
  };
  const lost = (c, why) => {
    console.log(`FAIL client ${c.idx} ${why}; ${deliveries} of ${expected} deliveries, ${errors} errors`);
    process.exit(1);
  };
  for (let i = 0; i < n; i++) {
    const c = { idx: i, next: new Array(n).fill(0), got: 0, synced: false };
    const feed = deframer((p) => onPacket(c, p));
    if (i < nws) {
      const ws = open(() => {
        if (ws.extensions) error(`client ${i}: extensions ${ws.extensions}`);
        if (++up === n) allUp();
      });
      ws.on('message', (d, isBinary) => (isBinary ? feed(d) : error(`client ${i}: a text message`)));
      ws.on('close', (code) => lost(c, `closed with ${code}`));
      c.send = (b) => ws.send(b, { binary: true });
    } else {
      const s = net.connect({ host: '127.0.0.1', port: num('tcp_port', 0) }, () => {
        if (++up === n) allUp();
      });
      s.on('data', feed);
      s.on('error', (e) => lost(c, `tcp: ${e.message}`));
      s.on('close', () => lost(c, 'tcp closed'));
      c.send = (b) => s.write(b);
    }
    clients.push(c);
  }
  setTimeout(() => {
    console.log(`CHAT ${deliveries} ${expected} ${errors}`);
    const fewest = Math.min(...clients.map((c) => c.got));
    fail(`timeout: ${up} of ${n} up, ${synced} synced, ${deliveries} of ${expected} deliveries, fewest ${fewest} of ${n * m} at one client`);
  }, num('timeout', 20) * 1000).unref();
}

// ---------------------------------------------------------------- load

function load() {
  echoLoad(num('conns', 1), (c, on) => {
    const ws = open(() => {
      console.log(`UP ${c}`);
      on.up();
    });
    ws.on('message', on.data);
    ws.removeAllListeners('error');
    ws.on('error', (e) => on.error(e.message));
    ws.on('close', (code) => on.closed(code === 1000, `CLOSED ${c} ${code}`));
    return { send: (b) => ws.send(b, { binary: true }), end: () => ws.close(1000, 'done') };
  });
}

// ---------------------------------------------------------------- the reference server

function server() {
  const http = require('http');
  const https = require('https');
  const page = opt.page ? fs.readFileSync(opt.page) : null;
  const onRequest = (req, res) => {
    if (req.method === 'GET' && req.url.split('?')[0] === '/' && page && !req.headers.upgrade) {
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' });
      res.end(page);
      return;
    }
    res.writeHead(req.headers.upgrade ? 426 : 404, { Connection: 'close' });
    res.end();
  };
  // maxHeaderSize: the request cap of cport's upgrade (8 KiB); Node answers
  // a longer request with 431.
  const o = { maxHeaderSize: 8192 };
  const tlsOn = Boolean(opt.cert && opt.key);
  const srv = tlsOn
    ? https.createServer({ ...o, cert: fs.readFileSync(opt.cert), key: fs.readFileSync(opt.key) }, onRequest)
    : http.createServer(o, onRequest);
  const wss = new WebSocket.Server({
    noServer: true,
    maxPayload: num('max', 65535),
    perMessageDeflate: false,
    handleProtocols: () => false,
  });
  const chatMode = opt.mode === 'chat';
  srv.on('upgrade', (req, socket, head) => {
    wss.handleUpgrade(req, socket, head, (ws) => {
      ws.on('error', () => {}); // protocol errors: ws closes with the code itself
      ws.on('message', (data, isBinary) => {
        if (!chatMode) ws.send(data, { binary: isBinary });
        else for (const c of wss.clients) if (c.readyState === WebSocket.OPEN) c.send(data, { binary: isBinary });
      });
    });
  });
  srv.listen(Number(target), '127.0.0.1', () => console.log(`LISTENING ${srv.address().port}`));
  if (opt.stdin === '1') {
    process.stdin.on('end', () => process.exit(0));
    process.stdin.resume();
  }
}

const modes = { burst, ping, text, big, close: closeMode, chat, load, server };
if (!modes[mode]) {
  console.log(`ERROR unknown mode ${mode} (${Object.keys(modes).join(', ')})`);
  process.exit(2);
}
if (!['server', 'load', 'chat'].includes(mode)) deadline();
modes[mode]();
