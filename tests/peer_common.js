// SPDX-License-Identifier: MIT
//
// What the Node.js peers of cport's tests share (tests/tls_peer.js,
// tests/ws_peer.js): their command line, the random packets, and the load
// mode's echo loop and lines.
'use strict';

// xorshift32: the same sizes and bytes for the same seed (seed=S).
let seed = 1;
function rand() {
  seed ^= seed << 13;
  seed >>>= 0;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  seed >>>= 0;
  return seed;
}

// The command line "node PEER.js A1 .. An key=value ...": args holds the n
// arguments A1 .. An, opt every key's value (as the text after its first
// "="), num(key, d) that value as a number, d without it. seed=S seeds rand.
function commandLine(n) {
  const argv = process.argv.slice(2);
  const opt = Object.fromEntries(argv.slice(n).map((a) => a.split(/=(.*)/s).slice(0, 2)));
  const num = (k, d) => (opt[k] === undefined ? d : Number(opt[k]));
  seed = num('seed', 1) >>> 0 || 1;
  return { args: argv.slice(0, n), opt, num };
}

// A cport packet: {u16 size, u16 id} little-endian, size counting the
// 4-byte header, then len random bytes.
function packet(id, len) {
  const b = Buffer.alloc(4 + len);
  b.writeUInt16LE(4 + len, 0);
  b.writeUInt16LE(id & 0xffff, 2);
  for (let i = 0; i < len; i++) b[4 + i] = rand() & 0xff;
  return b;
}

// The load mode: n connections, each echoing one packet of random size at a
// time, checked, for as long as stdin stays open; then each connection ends.
// open(c, on) opens connection c and returns { send(buffer), end() }; it
// calls on.up() once connected (after its own "UP" line), on.data(buffer)
// with what arrives, on.error(message), and on.closed(clean, line) when the
// connection is gone (clean: it ended as it should once stopping; line: the
// "CLOSED" line to print if it did not, or if it closed before the stop).
// Prints "MISMATCH <c>", "ERROR <c> <message>", every 50 ms "COUNT <echoes>
// <fewest echoes of one connection> <errors>", and once every connection
// closed "DONE <echoes> <errors>"; exits 0 without errors.
function echoLoad(n, open) {
  const counts = new Array(n).fill(0);
  let errors = 0;
  let stopping = false;
  let closed = 0;
  for (let c = 0; c < n; c++) {
    let want = null;
    let got = [];
    let len = 0;
    const next = () => {
      if (stopping) {
        conn.end();
        return;
      }
      want = packet(c, rand() % 2000);
      conn.send(want);
    };
    const conn = open(c, {
      up: next,
      data: (d) => {
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
        next();
      },
      error: (message) => {
        errors++;
        console.log(`ERROR ${c} ${message}`);
      },
      closed: (clean, line) => {
        if (!stopping || !clean) {
          errors++;
          console.log(line);
        }
        if (++closed === n) {
          console.log(`DONE ${counts.reduce((a, b) => a + b, 0)} ${errors}`);
          process.exit(errors ? 1 : 0);
        }
      },
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

module.exports = { commandLine, rand, packet, echoLoad };
