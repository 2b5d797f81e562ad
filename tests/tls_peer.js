// SPDX-License-Identifier: MIT
//
// A TLS client for tests/test_tls.c: Node's own TLS stack against a cport
// packet-echo server (packets {u16 size, u16 id} little-endian, size
// counting the 4-byte header). Started by the test as
//
//   node tls_peer.js MODE PORT CA_FILE [key=value ...]
//
// with the server's certificate as CA_FILE (verified, server name
// "localhost"). It prints what it saw on stdout, one line per fact, and
// exits 0 when everything came back byte-identical.
//
// Modes:
//   burst  packets=N seed=S max=TLSv1.2|TLSv1.3: N packets of random sizes
//          0..4000 (body) written as one stream cut at random points, each
//          piece its own write; the echo is compared byte for byte. Prints
//          "UP <protocol> <cipher> <CN>", then "OK <bytes>" and ends with
//          close_notify.
//   load   conns=N: N connections, each echoing one packet of random size
//          at a time, checked, for as long as stdin stays open. Prints
//          "UP <i> <CN>" per connection and every 50 ms "COUNT <echoes>
//          <fewest echoes of one connection> <errors>"; when stdin ends
//          each connection finishes its echo and ends with close_notify,
//          then "DONE <echoes> <errors>".
//   storm  handshakes=N parallel=P: N connections, P at a time, each a full
//          handshake, one echo and close_notify. Prints "STORM <ok>
//          <failed>" when all have closed.
'use strict';
const tls = require('tls');
const fs = require('fs');
const { commandLine, rand, packet, echoLoad } = require('./peer_common');

const { args, opt, num } = commandLine(3);
const [mode, portArg, caFile] = args;
const port = Number(portArg);
const ca = fs.readFileSync(caFile);

function connect(onUp) {
  const s = tls.connect(
    {
      host: '127.0.0.1',
      port,
      ca,
      servername: 'localhost',
      minVersion: 'TLSv1.2',
      maxVersion: opt.max || 'TLSv1.3',
    },
    () => onUp(s),
  );
  return s;
}

function peerCN(s) {
  const c = s.getPeerCertificate();
  return c && c.subject ? c.subject.CN : '?';
}

function write(s, data) {
  return new Promise((resolve) => s.write(data, resolve));
}

function burst() {
  const n = num('packets', 300);
  const parts = [];
  for (let i = 0; i < n; i++) parts.push(packet(i, rand() % 4001));
  const all = Buffer.concat(parts);
  const got = [];
  let len = 0;
  let ok = false;
  const s = connect(async () => {
    console.log(`UP ${s.getProtocol()} ${s.getCipher().name} ${peerCN(s)}`);
    // Awaiting each write makes each piece its own TLS record(s).
    for (let off = 0; off < all.length; ) {
      const take = Math.min(all.length - off, 1 + (rand() % 5000));
      await write(s, all.subarray(off, off + take));
      off += take;
    }
  });
  s.on('data', (d) => {
    got.push(d);
    len += d.length;
    if (len < all.length) return;
    const g = Buffer.concat(got);
    if (g.length !== all.length || !g.equals(all)) {
      let i = 0;
      while (i < g.length && g[i] === all[i]) i++;
      console.log(`MISMATCH at byte ${i} of ${all.length}, got ${g.length}`);
      process.exit(1);
    }
    ok = true;
    console.log(`OK ${all.length}`);
    s.end();
  });
  s.on('error', (e) => {
    console.log(`ERROR ${e.message}`);
    process.exit(1);
  });
  s.on('close', () => process.exit(ok ? 0 : 1));
}

function load() {
  echoLoad(num('conns', 1), (c, on) => {
    const s = connect(() => {
      console.log(`UP ${c} ${peerCN(s)}`);
      on.up();
    });
    s.on('data', on.data);
    s.on('error', (e) => on.error(e.message));
    s.on('close', () => on.closed(true, `CLOSED ${c}`));
    return { send: (b) => s.write(b), end: () => s.end() };
  });
}

function storm() {
  const n = num('handshakes', 300);
  const parallel = num('parallel', 50);
  let started = 0;
  let ok = 0;
  let failed = 0;
  let closed = 0;
  const one = () => {
    if (started >= n) return;
    const p = packet(++started, 16);
    let got = Buffer.alloc(0);
    let settled = false;
    const settle = (good, why) => {
      if (settled) return;
      settled = true;
      if (good) ok++;
      else {
        failed++;
        console.log(`FAILED ${why}`);
      }
      one();
    };
    const s = connect(() => s.write(p));
    s.on('data', (d) => {
      got = Buffer.concat([got, d]);
      if (got.length < p.length) return;
      settle(got.equals(p), 'echo differs');
      s.end();
    });
    s.on('error', (e) => settle(false, e.message));
    s.on('close', () => {
      settle(false, 'closed before the echo');
      if (++closed === n) {
        console.log(`STORM ${ok} ${failed}`);
        process.exit(failed ? 1 : 0);
      }
    });
  };
  for (let i = 0; i < parallel; i++) one();
}

({ burst, load, storm })[mode]();
