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

const [mode, portArg, caFile, ...rest] = process.argv.slice(2);
const opt = Object.fromEntries(rest.map((a) => a.split('=')));
const port = Number(portArg);
const ca = fs.readFileSync(caFile);

// xorshift32: the same sizes and bytes for the same seed.
let seed = Number(opt.seed || 1) >>> 0 || 1;
function rand() {
  seed ^= seed << 13;
  seed >>>= 0;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  seed >>>= 0;
  return seed;
}

function packet(id, len) {
  const b = Buffer.alloc(4 + len);
  b.writeUInt16LE(4 + len, 0);
  b.writeUInt16LE(id & 0xffff, 2);
  for (let i = 0; i < len; i++) b[4 + i] = rand() & 0xff;
  return b;
}

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
  const n = Number(opt.packets || 300);
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
  const n = Number(opt.conns || 1);
  const counts = new Array(n).fill(0);
  let errors = 0;
  let stopping = false;
  let closed = 0;
  for (let c = 0; c < n; c++) {
    let want = null;
    let got = [];
    let len = 0;
    const next = (s) => {
      if (stopping) {
        s.end();
        return;
      }
      want = packet(c, rand() % 2000);
      s.write(want);
    };
    const s = connect(() => {
      console.log(`UP ${c} ${peerCN(s)}`);
      next(s);
    });
    s.on('data', (d) => {
      got.push(d);
      len += d.length;
      if (!want || len < want.length) return;
      if (len !== want.length || !Buffer.concat(got).equals(want)) {
        errors++;
        console.log(`MISMATCH ${c}`);
      }
      got = [];
      len = 0;
      counts[c]++;
      next(s);
    });
    s.on('error', (e) => {
      errors++;
      console.log(`ERROR ${c} ${e.message}`);
    });
    s.on('close', () => {
      if (!stopping) {
        errors++;
        console.log(`CLOSED ${c}`);
      }
      if (++closed === n) {
        console.log(`DONE ${counts.reduce((a, b) => a + b, 0)} ${errors}`);
        process.exit(errors ? 1 : 0);
      }
    });
  }
  setInterval(() => {
    const total = counts.reduce((a, b) => a + b, 0);
    console.log(`COUNT ${total} ${Math.min(...counts)} ${errors}`);
  }, 50);
  process.stdin.on('end', () => {
    stopping = true;
  });
  process.stdin.resume();
}

function storm() {
  const n = Number(opt.handshakes || 300);
  const parallel = Number(opt.parallel || 50);
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
