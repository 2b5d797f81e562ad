// SPDX-License-Identifier: MIT
//
// A case-by-case probe of RFC 6455's edge cases against a WebSocket echo
// server, over raw TCP (node's net, or tls: no WebSocket library), so that
// every byte on the wire is the probe's own. Each case opens its own
// connection, does its own upgrade, sends crafted frames and records what
// the server did as a short canonical string. The probe is run against the
// reference server (node tests/ws_peer.js server PORT max=4096), whose
// results are tests/ws_probe.expected, and against cport's server, whose
// results must be the same but where the file says cport differs by design.
//
//   node ws_probe.js PORT [key=value ...]
//     host=H        (127.0.0.1)
//     ca=FILE       speak TLS (wss), verifying the server for "localhost"
//     limit=B       the server's message limit (4096, cport's default
//                   max_packet; at most 65535): the cases at and over it
//     only=a,b      run only these cases
//     expect=FILE   compare with FILE (tests/ws_probe.expected); exit 1 on
//     target=T      a difference; T is reference (its CASE lines), cport
//                   (CPORT and CPORT-NOTEXT lines, else CASE) or cport-text
//                   (a cport server that allows text: CPORT and CPORT-TEXT)
//     list=1        print the cases' names and what they check, and exit
//
// Output: "CASE <name> <outcome>" per case, in a fixed order, then
// "SUMMARY <n> cases" (with expect=: "SUMMARY <n> cases, <d> differ", and a
// "DIFF <name> got <outcome> want <outcome>" line before it per difference).
// Exit 0, or 1 when expect= found a difference, 2 on bad usage.
//
// An outcome is a comma-separated list of what happened, in order:
//   101            the upgrade was accepted (shown only in the upgrade cases)
//   http:N         the upgrade was refused with status N; ";version=V" adds
//                  the Sec-WebSocket-Version header the answer carried
//   +ext=X +proto=Y  an accepted upgrade that carried these headers (none
//                  should: the client's offers are to be declined)
//   bad-accept     an accepted upgrade with a wrong Sec-WebSocket-Accept
//   echo:NB        data came back in binary messages, N bytes, byte-
//                  identical to what the case sent (packets: an echo of
//                  packets and an echo of messages give the same bytes);
//                  echo-text:NB in text messages, echo-mixed:NB in both
//   echo-bad:NB:H  N bytes came back that differ (H: a hash of them);
//                  echo-partial:NB: fewer than were sent
//   pong:NB        a pong with the ping's payload of N bytes; pong-bad:NB:H
//                  one with other bytes, or unasked
//   close:C        a close frame with code C (close:none: without a code);
//                  the probe answers it, and the server must then end the
//                  connection ("open" follows when it did not, in 2 s)
//   dropped        the connection ended with no close frame
//   timeout        nothing more happened for 2 s (each case's bound; a
//                  case takes 4 s at most: 2 more after a close frame)
//   masked! rsv! op:N!  a frame from the server that is masked, has RSV
//                  bits set, or has an opcode it must not send
// A case whose frames are all fine closes with 1000 once its echo (and its
// pongs) came back, so its outcome ends with close:1000: the session is
// still in order after the case.
'use strict';
const crypto = require('crypto');
const fs = require('fs');
const net = require('net');
const tls = require('tls');

const [portArg, ...rest] = process.argv.slice(2);
const opt = Object.fromEntries(rest.map((a) => a.split(/=(.*)/s).slice(0, 2)));
const port = Number(portArg);
const host = opt.host || '127.0.0.1';
const LIMIT = Number(opt.limit || 4096);
const CASE_MS = 2000;
if (!opt.list && (!(port > 0 && port < 65536) || !(LIMIT >= 16 && LIMIT <= 65535))) {
  console.log('usage: node ws_probe.js PORT [host=H] [ca=FILE] [limit=B] [only=a,b] [expect=FILE target=reference|cport]');
  process.exit(2);
}
const ca = opt.ca ? fs.readFileSync(opt.ca) : null;

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const OP = { cont: 0, text: 1, bin: 2, close: 8, ping: 9, pong: 10 };

// ---------------------------------------------------------------- bytes

// xorshift32, reseeded per case from its name: the same bytes every run.
let seed = 1;
function reseed(name) {
  seed = 2166136261;
  for (const ch of name) seed = Math.imul(seed ^ ch.charCodeAt(0), 16777619) >>> 0;
  seed = seed || 1;
}
function rand() {
  seed ^= seed << 13;
  seed >>>= 0;
  seed ^= seed >>> 17;
  seed ^= seed << 5;
  seed >>>= 0;
  return seed;
}
function randBytes(n) {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = rand() & 0xff;
  return b;
}

// cport packets {u16 size, u16 id} little-endian, size counting the header.
function packet(size) {
  const b = randBytes(size);
  b.writeUInt16LE(size, 0);
  b.writeUInt16LE(rand() & 0xffff, 2);
  return b;
}
const packets = (...sizes) => Buffer.concat(sizes.map(packet));

const hash = (b) => crypto.createHash('sha256').update(b).digest('hex').slice(0, 8);

// A client frame. len16/len64 force a longer length encoding than needed;
// rawLen replaces the length fields (the 7 bits and what follows) as given.
function frame(op, payload = Buffer.alloc(0), o = {}) {
  const fin = o.fin === false ? 0 : 0x80;
  const mask = o.mask === false ? 0 : 0x80;
  const b0 = Buffer.from([fin | ((o.rsv || 0) << 4) | op]);
  let len;
  const n = payload.length;
  if (o.rawLen) len = o.rawLen;
  else if (n < 126 && !o.len16 && !o.len64) len = Buffer.from([mask | n]);
  else if (n < 65536 && !o.len64) {
    len = Buffer.from([mask | 126, 0, 0]);
    len.writeUInt16BE(n, 1);
  } else {
    len = Buffer.alloc(9);
    len[0] = mask | 127;
    len.writeBigUInt64BE(BigInt(n), 1);
  }
  if (!mask) return Buffer.concat([b0, len, payload]);
  const key = randBytes(4);
  const body = Buffer.from(payload);
  for (let i = 0; i < body.length; i++) body[i] ^= key[i & 3];
  return Buffer.concat([b0, len, key, body]);
}
const bin = (p, o) => frame(OP.bin, p, o);
const cont = (p, o) => frame(OP.cont, p, o);
function closePayload(code, reason = '') {
  const r = Buffer.isBuffer(reason) ? reason : Buffer.from(reason);
  const b = Buffer.alloc(2 + r.length);
  b.writeUInt16BE(code, 0);
  r.copy(b, 2);
  return b;
}
const close = (code, reason, o) => frame(OP.close, closePayload(code, reason), o);

// ---------------------------------------------------------------- the request

function wsKey() {
  return randBytes(16).toString('base64');
}

// The upgrade request as a list of [name, value] headers, for a case to
// change; build() makes the bytes.
function upgradeHeaders(key) {
  return [
    ['Host', `${host}:${port}`],
    ['Upgrade', 'websocket'],
    ['Connection', 'Upgrade'],
    ['Sec-WebSocket-Key', key],
    ['Sec-WebSocket-Version', '13'],
  ];
}
function build(headers, method = 'GET', target = '/') {
  const lines = [`${method} ${target} HTTP/1.1`, ...headers.map(([k, v]) => `${k}: ${v}`)];
  return Buffer.from(`${lines.join('\r\n')}\r\n\r\n`, 'latin1');
}
function setHeader(headers, name, value) {
  const h = headers.filter(([k]) => k.toLowerCase() !== name.toLowerCase());
  if (value !== null) h.push([name, value]);
  return h;
}

// ---------------------------------------------------------------- the cases

// A case is a name, what it checks, and make(key), which returns what to do:
// { request: Buffer (default: the plain upgrade), writes: [Buffer] (the
// request in pieces), pipelined: the frames go right after the request,
// frames: [Buffer] (after the 101 otherwise), echo: Buffer (what must come
// back), pings: [Buffer] (the payloads of the pongs to wait for), error: the
// server is to close (the probe sends no closing 1000), upgrade: report the
// 101, fin: half-close after the frames }.
const cases = [];
function add(name, what, make) {
  cases.push({ name, what, make });
}

// Upgrades: header matching is case-insensitive and token-based; what must
// be refused is refused with a status.
function upgradeCase(name, what, change, extra = {}) {
  add(name, what, (key) => {
    const p = packets(12, 40);
    const c = { upgrade: true, frames: [bin(p)], echo: p, ...extra };
    c.request = change(upgradeHeaders(key), key);
    return c;
  });
}
upgradeCase('upgrade_plain', 'the plain request', (h) => build(h));
upgradeCase('upgrade_connection_list', 'Connection: keep-alive, Upgrade', (h) =>
  build(setHeader(h, 'Connection', 'keep-alive, Upgrade')),
);
upgradeCase('upgrade_mixed_case', 'header names and values in mixed case', (h, key) =>
  build([
    ['hOsT', `${host}:${port}`],
    ['UPGRADE', 'WebSocket'],
    ['connection', 'uPgRaDe'],
    ['sec-websocket-key', key],
    ['SEC-WEBSOCKET-VERSION', '13'],
  ]),
);
upgradeCase('upgrade_whitespace', 'optional whitespace around header values', (h, key) =>
  Buffer.from(
    `GET / HTTP/1.1\r\nHost:${host}:${port}\r\nUpgrade: \t websocket \t\r\n` +
      `Connection:Upgrade\r\nSec-WebSocket-Key:   ${key}  \r\nSec-WebSocket-Version:13\r\n\r\n`,
    'latin1',
  ),
);
upgradeCase('upgrade_any_path', 'a path and a query', (h) => build(h, 'GET', '/any/path?room=1&x=%20'));
upgradeCase('upgrade_extra_headers', 'Origin, User-Agent, Cookie, a repeated header', (h) =>
  build([
    ...h,
    ['Origin', 'http://localhost'],
    ['User-Agent', 'ws_probe'],
    ['Cookie', 'a=1; b=2'],
    ['Accept', 'text/html'],
    ['Accept', '*/*'],
  ]),
);
upgradeCase('upgrade_deflate_offered', 'permessage-deflate offered: accepted without it', (h) =>
  build([...h, ['Sec-WebSocket-Extensions', 'permessage-deflate; client_max_window_bits']]),
);
upgradeCase('upgrade_subprotocol_offered', 'subprotocols offered: accepted without one', (h) =>
  build([...h, ['Sec-WebSocket-Protocol', 'chat, superchat']]),
);
upgradeCase('upgrade_frame_with_request', 'the first frame in the same write as the request', (h) => build(h), {
  pipelined: true,
});
add('upgrade_bytewise', 'the request a few bytes per write', (key) => {
  const req = build(upgradeHeaders(key));
  const writes = [];
  for (let off = 0; off < req.length; ) {
    const take = 1 + (rand() % 5);
    writes.push(req.subarray(off, off + take));
    off += take;
  }
  const p = packets(30);
  return { upgrade: true, writes, frames: [bin(p)], echo: p };
});
upgradeCase('upgrade_no_key', 'no Sec-WebSocket-Key: 400', (h) => build(setHeader(h, 'Sec-WebSocket-Key', null)));
upgradeCase('upgrade_bad_key', 'a key that is not 16 bytes in base64: 400', (h) =>
  build(setHeader(h, 'Sec-WebSocket-Key', 'c2hvcnQ=')),
);
upgradeCase('upgrade_version_12', 'version 12: refused, naming 13', (h) => build(setHeader(h, 'Sec-WebSocket-Version', '12')));
upgradeCase('upgrade_no_version', 'no version: refused, naming 13', (h) =>
  build(setHeader(h, 'Sec-WebSocket-Version', null)),
);
upgradeCase('upgrade_post', 'POST instead of GET', (h) => build(h, 'POST'));
upgradeCase('upgrade_not_websocket', 'Upgrade: h2c', (h) => build(setHeader(h, 'Upgrade', 'h2c')));
upgradeCase('upgrade_over_8k', 'a request over 8 KiB', (h) => build([...h, ['X-Pad', 'p'.repeat(9000)]]));
upgradeCase('plain_get', 'GET / without an upgrade: a page, 404 or 426', () =>
  build([
    ['Host', `${host}:${port}`],
    ['Connection', 'close'],
  ]),
);

// Data: the payloads of binary messages form the byte stream.
function dataCase(name, what, make) {
  add(name, what, () => make());
}
dataCase('binary_one_packet', 'one packet in one message', () => {
  const p = packets(100);
  return { frames: [bin(p)], echo: p };
});
dataCase('binary_packets_in_one_message', 'five packets in one message', () => {
  const p = packets(4, 9, 300, 17, 1000);
  return { frames: [bin(p)], echo: p };
});
dataCase('binary_packet_over_messages', 'one packet over three messages, cut inside its header', () => {
  const p = packets(700);
  return { frames: [bin(p.subarray(0, 3)), bin(p.subarray(3, 400)), bin(p.subarray(400))], echo: p };
});
dataCase('binary_empty_message', 'an empty message, then a packet', () => {
  const p = packets(20);
  return { frames: [bin(Buffer.alloc(0)), bin(p)], echo: p };
});
dataCase('binary_len16_nonminimal', 'a 10-byte payload with a 16-bit length', () => {
  const p = packets(10);
  return { frames: [bin(p, { len16: true })], echo: p };
});
dataCase('binary_len64_nonminimal', 'a 10-byte payload with a 64-bit length', () => {
  const p = packets(10);
  return { frames: [bin(p, { len64: true })], echo: p };
});
dataCase('binary_len_126', 'a 126-byte payload (the first 16-bit length)', () => {
  const p = packets(126);
  return { frames: [bin(p)], echo: p };
});
dataCase('binary_at_limit', 'a message of exactly the limit', () => {
  const p = packets(LIMIT);
  return { frames: [bin(p)], echo: p };
});
dataCase('binary_over_limit', 'a message one byte over the limit: 1009', () => {
  const p = Buffer.concat([packet(LIMIT), randBytes(1)]);
  return { frames: [bin(p)], error: true };
});
dataCase('binary_over_limit_fragmented', 'fragments adding up to one byte over the limit: 1009', () => {
  // No packet is complete before the fragment that goes over.
  const p = Buffer.concat([packet(LIMIT), randBytes(1)]);
  const a = LIMIT >> 1;
  return {
    frames: [bin(p.subarray(0, a), { fin: false }), cont(p.subarray(a, LIMIT - 1), { fin: false }), cont(p.subarray(LIMIT - 1))],
    error: true,
  };
});
dataCase('len64_top_bit', 'a 64-bit length with its top bit set', () => ({
  frames: [bin(randBytes(16), { rawLen: Buffer.from([0xff, 0x80, 0, 0, 0, 0, 0, 0, 0x10]) })],
  error: true,
}));
dataCase('len64_huge', 'a 64-bit length of 2^40', () => ({
  frames: [bin(randBytes(16), { rawLen: Buffer.from([0xff, 0, 0, 1, 0, 0, 0, 0, 0]) })],
  error: true,
}));
dataCase('unmasked_binary', 'a client frame without a mask: 1002', () => ({
  frames: [bin(packets(20), { mask: false })],
  error: true,
}));
dataCase('unmasked_ping', 'a client ping without a mask: 1002', () => ({
  frames: [frame(OP.ping, Buffer.from('x'), { mask: false })],
  error: true,
}));

// Fragmentation, with control frames in the middle.
dataCase('fragmented_ping_pong_inside', 'a message in 3 fragments, a ping and a pong between', () => {
  const p = packets(5, 200, 33, 64);
  return {
    frames: [
      bin(p.subarray(0, 7), { fin: false }),
      frame(OP.ping, Buffer.from('in the middle')),
      cont(p.subarray(7, 250), { fin: false }),
      frame(OP.pong, Buffer.from('unasked')),
      cont(p.subarray(250)),
    ],
    echo: p,
    pings: [Buffer.from('in the middle')],
  };
});
dataCase('fragmented_empty_fragments', 'empty first and middle fragments', () => {
  const p = packets(50);
  return { frames: [bin(Buffer.alloc(0), { fin: false }), cont(Buffer.alloc(0), { fin: false }), cont(p)], echo: p };
});
dataCase('fragmented_many', 'one message in 25 fragments', () => {
  const p = packets(10, 90, 4, 400);
  const frames = [];
  for (let i = 0, off = 0; i < 25; i++) {
    const end = i === 24 ? p.length : Math.min(p.length, off + (rand() % 40));
    frames.push(i === 0 ? bin(p.subarray(off, end), { fin: false }) : cont(p.subarray(off, end), { fin: i === 24 }));
    off = end;
  }
  return { frames, echo: p };
});
dataCase('fragmented_close_inside', 'a close between fragments (a packet unfinished)', () => {
  const p = packets(300);
  return { frames: [bin(p.subarray(0, 100), { fin: false }), close(1000, 'mid')], error: true };
});
dataCase('new_binary_inside_binary', 'a new binary frame inside a fragmented binary message: 1002', () => {
  const p = packets(300);
  return { frames: [bin(p.subarray(0, 3), { fin: false }), bin(p.subarray(3))], error: true };
});
dataCase('new_text_inside_binary', 'a new text frame inside a fragmented binary message: 1002', () => {
  const p = packets(300);
  return { frames: [bin(p.subarray(0, 3), { fin: false }), frame(OP.text, Buffer.from('hi'))], error: true };
});
dataCase('new_binary_inside_text', 'a new binary frame inside a fragmented text message: 1002', () => ({
  frames: [frame(OP.text, Buffer.from('hel'), { fin: false }), bin(packets(8))],
  error: true,
}));
dataCase('new_text_inside_text', 'a new text frame inside a fragmented text message: 1002', () => ({
  frames: [frame(OP.text, Buffer.from('hel'), { fin: false }), frame(OP.text, Buffer.from('lo'))],
  error: true,
}));
dataCase('continuation_first', 'a continuation with nothing to continue: 1002', () => ({
  frames: [cont(packets(8))],
  error: true,
}));
dataCase('continuation_after_message', 'a continuation after a finished message: echo, then 1002', () => {
  const p = packets(8);
  return { frames: [bin(p), cont(packets(8))], echo: p, error: true };
});

// Control frames.
dataCase('ping_empty', 'a ping without payload', () => ({ frames: [frame(OP.ping)], pings: [Buffer.alloc(0)] }));
dataCase('ping_payload', 'a ping with 11 bytes', () => {
  const b = Buffer.from('cport-ping!');
  return { frames: [frame(OP.ping, b)], pings: [b] };
});
dataCase('ping_125', 'a ping with 125 bytes, the most a control frame holds', () => {
  const b = randBytes(125);
  return { frames: [frame(OP.ping, b)], pings: [b] };
});
dataCase('ping_126', 'a ping with 126 bytes: 1002', () => ({ frames: [frame(OP.ping, randBytes(126))], error: true }));
dataCase('ping_fragmented', 'a ping without FIN: 1002', () => ({
  frames: [frame(OP.ping, Buffer.from('a'), { fin: false })],
  error: true,
}));
dataCase('pong_unasked', 'an unasked pong is ignored', () => {
  const p = packets(16);
  return { frames: [frame(OP.pong, Buffer.from('hello')), bin(p)], echo: p };
});
for (const bit of [1, 2, 3]) {
  dataCase(`rsv${bit}`, `RSV${bit} set without an extension: 1002`, () => ({
    frames: [bin(packets(8), { rsv: 1 << (3 - bit) })],
    error: true,
  }));
}
for (const op of [3, 4, 5, 6, 7, 11, 12, 13, 14, 15]) {
  dataCase(`opcode_${op}`, `reserved opcode ${op}: 1002`, () => ({ frames: [frame(op, Buffer.from('x'))], error: true }));
}

// The close handshake.
dataCase('close_1000_reason', 'close 1000 with a reason: the code echoed', () => ({
  frames: [close(1000, 'client says bye')],
  error: true,
}));
dataCase('close_empty', 'close without a code: a close without one', () => ({ frames: [frame(OP.close)], error: true }));
dataCase('close_1001', 'close 1001', () => ({ frames: [close(1001)], error: true }));
dataCase('close_3000', 'close 3000 (registered range)', () => ({ frames: [close(3000, 'x')], error: true }));
dataCase('close_4999', 'close 4999 (private range)', () => ({ frames: [close(4999)], error: true }));
dataCase('close_123_reason', 'close with 123 bytes of reason (125 in all)', () => ({
  frames: [close(1000, 'r'.repeat(123))],
  error: true,
}));
dataCase('close_124_reason', 'close with 124 bytes of reason (126 in all): 1002', () => ({
  frames: [close(1000, 'r'.repeat(124))],
  error: true,
}));
dataCase('close_1_byte', 'close with 1 byte of payload: 1002', () => ({
  frames: [frame(OP.close, Buffer.from([0x03]))],
  error: true,
}));
dataCase('close_1012', 'close 1012 (registered with IANA after RFC 6455)', () => ({
  frames: [close(1012)],
  error: true,
}));
for (const code of [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]) {
  dataCase(`close_${code}`, `close with the invalid code ${code}: 1002`, () => ({ frames: [close(code)], error: true }));
}
dataCase('close_bad_utf8_reason', 'close with a reason that is not UTF-8', () => ({
  frames: [close(1000, Buffer.from([0xce, 0xba, 0xe1, 0xbd]))],
  error: true,
}));
dataCase('close_fragmented', 'a close without FIN: 1002', () => ({
  frames: [close(1000, '', { fin: false })],
  error: true,
}));
dataCase('data_after_close', 'a packet after the close: not echoed', () => ({
  frames: [close(1000), bin(packets(20))],
  error: true,
}));
dataCase('tcp_fin', 'the client ends the connection without a close frame', () => ({
  frames: [],
  error: true,
  fin: true,
}));

// Text: cport refuses it by default (1003); ws's echo server takes it.
// The payloads are packets whose bytes are also UTF-8 (the size < 128 and
// the id "AB"), so that a server that lets text into the byte stream echoes
// them as packets.
function textPacket(body) {
  const b = Buffer.from(body);
  return Buffer.concat([Buffer.from([4 + b.length, 0, 0x41, 0x42]), b]);
}
dataCase('text_valid', 'a text message of valid UTF-8', () => {
  const t = textPacket('héllo, wörld ☃');
  return { frames: [frame(OP.text, t)], echo: t };
});
dataCase('text_valid_split', 'valid UTF-8 with a character split over fragments', () => {
  const t = textPacket('κόσμε');
  return { frames: [frame(OP.text, t.subarray(0, 7), { fin: false }), cont(t.subarray(7))], echo: t };
});
dataCase('text_invalid_utf8', 'a text message that is not UTF-8', () => ({
  frames: [frame(OP.text, textPacket(Buffer.from([0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xed, 0xa0, 0x80])))],
  error: true,
}));

// ---------------------------------------------------------------- one case

function connect() {
  return ca
    ? tls.connect({ host, port, ca, servername: 'localhost' })
    : net.connect({ host, port });
}

function accepted(head, key) {
  const want = crypto.createHash('sha1').update(key + GUID).digest('base64');
  const h = {};
  for (const line of head.split('\r\n').slice(1)) {
    const i = line.indexOf(':');
    if (i > 0) h[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
  }
  const notes = [];
  if (h['sec-websocket-accept'] !== want) notes.push('bad-accept');
  if ((h.upgrade || '').toLowerCase() !== 'websocket') notes.push('bad-upgrade');
  if (!/(^|,)\s*upgrade\s*(,|$)/i.test(h.connection || '')) notes.push('bad-connection');
  if (h['sec-websocket-extensions'] !== undefined) notes.push(`+ext=${h['sec-websocket-extensions'].replace(/\s/g, '')}`);
  if (h['sec-websocket-protocol'] !== undefined) notes.push(`+proto=${h['sec-websocket-protocol'].replace(/\s/g, '')}`);
  return { h, notes };
}

function runCase(c) {
  reseed(c.name);
  const key = wsKey();
  const k = c.make(key);
  const request = k.request || build(upgradeHeaders(key));
  const echoWant = k.echo || Buffer.alloc(0);
  const pings = k.pings || [];
  return new Promise((resolve) => {
    const out = [];
    const s = connect();
    let head = Buffer.alloc(0);
    let upgraded = false;
    let rx = Buffer.alloc(0);
    // Everything that came back in data frames, and in which kinds of
    // message (binary, text): one stream, as the session's byte stream is.
    const echo = { got: [], len: 0, done: false, kinds: new Set(), lastOp: 0 };
    let pongs = 0;
    // A case that sends a close of its own (valid or not) does not answer
    // the server's.
    let closeSent = k.frames.some((f) => (f[0] & 0x0f) === OP.close);
    let closeGot = false;
    let done = false;
    let timer = setTimeout(() => finish('timeout'), CASE_MS);
    const rearm = () => {
      clearTimeout(timer);
      timer = setTimeout(() => finish('open'), CASE_MS);
    };
    const write = (b) => {
      if (!s.destroyed) s.write(b);
    };

    // What came back and was not reported yet (a partial or wrong echo).
    const echoTag = () => (echo.kinds.size > 1 ? 'echo-mixed' : echo.kinds.has(OP.text) ? 'echo-text' : 'echo');
    const flushEcho = () => {
      if (!echo.done && echo.len > 0) {
        const g = Buffer.concat(echo.got);
        if (echo.len < echoWant.length && g.equals(echoWant.subarray(0, echo.len)))
          out.push(`${echoTag()}-partial:${echo.len}B`);
        else out.push(`${echoTag()}-bad:${echo.len}B:${hash(g)}`);
      }
      echo.done = true;
    };
    function finish(tok) {
      if (done) return;
      done = true;
      flushEcho();
      if (tok) out.push(tok);
      clearTimeout(timer);
      s.destroy();
      resolve(out.join(',') || 'nothing');
    }

    // Every expected echo and pong is in: close with 1000, so the outcome
    // also says the session is still in order.
    const checkDone = () => {
      if (!echo.done && echoWant.length && echo.len >= echoWant.length) {
        const g = Buffer.concat(echo.got);
        if (g.equals(echoWant)) {
          out.push(`${echoTag()}:${g.length}B`);
          echo.done = true;
        }
      }
      const complete = (echoWant.length === 0 || echo.done) && pongs >= pings.length;
      if (complete && !k.error && !closeSent && !closeGot) {
        closeSent = true;
        write(close(1000, 'probe done'));
      }
    };

    const onFrame = (b0, payload) => {
      const op = b0 & 0x0f;
      if (op === OP.bin || op === OP.text || (op === OP.cont && echo.lastOp)) {
        if (op !== OP.cont) echo.lastOp = op;
        echo.kinds.add(echo.lastOp);
        echo.got.push(payload);
        echo.len += payload.length;
      } else if (op === OP.pong) {
        const want = pings[pongs];
        if (want && payload.equals(want)) out.push(`pong:${payload.length}B`);
        else out.push(`pong-bad:${payload.length}B:${hash(payload)}`);
        pongs++;
      } else if (op === OP.ping) {
        write(frame(OP.pong, payload)); // a keepalive: answered, not reported
      } else if (op === OP.close) {
        flushEcho();
        out.push(payload.length >= 2 ? `close:${payload.readUInt16BE(0)}` : payload.length ? 'close:bad' : 'close:none');
        closeGot = true;
        if (!closeSent) {
          closeSent = true;
          write(frame(OP.close, payload.subarray(0, 2)));
        }
        rearm();
        return;
      } else {
        out.push(`op:${op}!`);
      }
      checkDone();
    };

    const parseFrames = () => {
      while (!done && rx.length >= 2) {
        const b0 = rx[0];
        const b1 = rx[1];
        let n = b1 & 0x7f;
        let off = 2;
        if (n === 126) {
          if (rx.length < 4) return;
          n = rx.readUInt16BE(2);
          off = 4;
        } else if (n === 127) {
          if (rx.length < 10) return;
          n = Number(rx.readBigUInt64BE(2));
          off = 10;
        }
        if (b1 & 0x80) return finish('masked!');
        if (b0 & 0x70) return finish('rsv!');
        if (rx.length < off + n) return;
        const payload = Buffer.from(rx.subarray(off, off + n));
        rx = rx.subarray(off + n);
        onFrame(b0, payload);
      }
    };

    const onHead = () => {
      const i = head.indexOf('\r\n\r\n');
      if (i < 0) {
        if (head.length > 65536) finish('http:endless-head');
        return;
      }
      const text = head.subarray(0, i).toString('latin1');
      const m = /^HTTP\/1\.[01] (\d{3})/.exec(text);
      if (!m) return finish('http:garbage');
      // The accept answers the key the request carried (a case may change it).
      const sent = /^sec-websocket-key:[ \t]*(.*?)[ \t]*$/im.exec(request.toString('latin1'));
      const { h, notes } = accepted(text, sent ? sent[1] : '');
      if (m[1] !== '101') {
        const v = h['sec-websocket-version'];
        return finish(`http:${m[1]}${v !== undefined ? `;version=${v.replace(/\s/g, '')}` : ''}`);
      }
      upgraded = true;
      if (k.upgrade) out.push('101');
      out.push(...notes);
      rx = head.subarray(i + 4);
      head = null;
      if (!k.pipelined) for (const f of k.frames) write(f);
      if (k.fin) s.end();
      checkDone();
      parseFrames();
    };

    s.on(ca ? 'secureConnect' : 'connect', () => {
      s.setNoDelay(true);
      for (const w of k.writes || [request]) write(w);
      if (k.pipelined) for (const f of k.frames) write(f);
    });
    s.on('data', (d) => {
      if (done) return;
      if (!upgraded) {
        head = Buffer.concat([head, d]);
        onHead();
      } else {
        rx = Buffer.concat([rx, d]);
        parseFrames();
      }
    });
    s.on('error', () => {}); // a reset: 'close' follows
    s.on('close', () => finish(closeGot ? null : 'dropped'));
  });
}

// ---------------------------------------------------------------- the run

// The outcomes FILE expects of target T (see tests/ws_probe.expected):
// CASE lines, overridden for cport by CPORT lines, and by CPORT-NOTEXT or
// CPORT-TEXT lines as its text option is off or on.
const TARGETS = { reference: [], cport: ['CPORT', 'CPORT-NOTEXT'], 'cport-text': ['CPORT', 'CPORT-TEXT'] };
function readExpected(file, target) {
  const want = new Map();
  const marks = new Map(TARGETS[target].map((kind) => [kind, new Map()]));
  for (const raw of fs.readFileSync(file, 'utf8').split('\n')) {
    const line = raw.replace(/#.*/, '').trim();
    if (!line) continue;
    const [kind, name, outcome] = line.split(/\s+/);
    if (kind === 'CASE') want.set(name, outcome);
    else if (marks.has(kind)) marks.get(kind).set(name, outcome);
  }
  for (const m of marks.values()) for (const [name, outcome] of m) want.set(name, outcome);
  return want;
}

async function main() {
  if (opt.list) {
    for (const c of cases) console.log(`${c.name}  ${c.what}`);
    return 0;
  }
  const only = opt.only ? new Set(opt.only.split(',')) : null;
  const target = opt.target || 'reference';
  if (!TARGETS[target]) {
    console.log(`bad target ${target} (${Object.keys(TARGETS).join(', ')})`);
    return 2;
  }
  const want = opt.expect ? readExpected(opt.expect, target) : null;
  const diffs = [];
  let n = 0;
  for (const c of cases) {
    if (only && !only.has(c.name)) continue;
    const got = await runCase(c);
    n++;
    console.log(`CASE ${c.name} ${got}`);
    if (want) {
      const w = want.get(c.name);
      // An expected outcome may list alternatives the RFC allows: a|b.
      if (w === undefined || !w.split('|').includes(got)) diffs.push(`DIFF ${c.name} got ${got} want ${w || '(none)'}`);
    }
  }
  if (!want) {
    console.log(`SUMMARY ${n} cases`);
    return 0;
  }
  for (const d of diffs) console.log(d);
  console.log(`SUMMARY ${n} cases, ${diffs.length} differ (${opt.expect}, ${target})`);
  return diffs.length ? 1 : 0;
}

main().then((rc) => process.exit(rc));
