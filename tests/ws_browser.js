// SPDX-License-Identifier: MIT
//
// Headless Chromium (Debian's chromium package) loads a page and reports the
// result the page writes into its title: tools/ws_chat.html's ?check= mode, "PASS ..." or
// "FAIL ...". Node built-ins only: the browser is driven over the DevTools
// protocol on a pipe (--remote-debugging-pipe: JSON messages ending in NUL
// on its file descriptors 3 and 4), so nothing listens on a port and no
// driver package is needed. --dump-dom would not do: it reads the page when
// it has loaded, before the WebSocket exchange, and --virtual-time-budget
// runs the page's clock ahead while it waits on the network.
//
//   node ws_browser.js URL [timeout=S (20)] [ca=FILE] [chromium=PATH] [shot=FILE.png]
//
// URL is the page, as served by the server under test (http:// for ws://,
// https:// for wss://). With ca=FILE, the server's certificate (self-signed:
// bench/tls_cert.sh) is trusted by its public key
// (--ignore-certificate-errors-spki-list), no other. Prints
// "BROWSER <version>", then the page's log lines as "PAGE <line>" once it
// is done, then "RESULT <title>"; exit 0 on PASS, 1 on FAIL or a timeout,
// 2 when chromium is missing or does not start. With shot=FILE, a PASS
// also saves a screenshot of the page (1280x900) to FILE.
'use strict';
const { spawn } = require('child_process');
const crypto = require('crypto');
const fs = require('fs');
const os = require('os');
const path = require('path');

const [url, ...rest] = process.argv.slice(2);
const opt = Object.fromEntries(rest.map((a) => a.split(/=(.*)/s).slice(0, 2)));
const timeoutMs = Number(opt.timeout || 20) * 1000;
const chromium = opt.chromium || '/usr/bin/chromium';
if (!url) {
  console.log('usage: node ws_browser.js URL [timeout=S] [ca=FILE] [chromium=PATH]');
  process.exit(2);
}
if (!fs.existsSync(chromium)) {
  console.log(`ERROR ${chromium} is not installed (apt-get install chromium)`);
  process.exit(2);
}

// The base64 SHA-256 of the certificate's public key, as Chromium's
// --ignore-certificate-errors-spki-list takes it.
function spkiHash(file) {
  const cert = new crypto.X509Certificate(fs.readFileSync(file));
  const der = cert.publicKey.export({ type: 'spki', format: 'der' });
  return crypto.createHash('sha256').update(der).digest('base64');
}

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'ws_browser-'));
const args = [
  '--headless=new',
  '--no-sandbox', // as root (CI), Chromium's sandbox cannot start
  '--disable-gpu',
  '--remote-debugging-pipe',
  `--user-data-dir=${profile}`,
  '--no-first-run',
  '--no-default-browser-check',
  '--disable-extensions',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--metrics-recording-only',
  '--mute-audio',
];
if (opt.ca) args.push(`--ignore-certificate-errors-spki-list=${spkiHash(opt.ca)}`);
args.push('about:blank');

const child = spawn(chromium, args, { stdio: ['ignore', 'ignore', 'pipe', 'pipe', 'pipe'] });
let stderr = '';
child.stderr.on('data', (d) => {
  stderr = (stderr + d).slice(-4000);
});
child.on('error', (e) => quit(2, `ERROR cannot start ${chromium}: ${e.message}`));
child.on('exit', (code, sig) => quit(2, `ERROR chromium exited (${code ?? sig})\n${stderr}`));

// Ends the run: the browser is asked to close (killed if it has not in 3 s),
// then its profile is removed once it has exited and no longer writes there.
let quitting = false;
let lastTitle = '';
async function quit(rc, line) {
  if (quitting) return;
  quitting = true;
  if (line) console.log(line);
  child.removeAllListeners('exit');
  if (child.exitCode === null && child.signalCode === null) {
    const exited = new Promise((resolve) => child.once('exit', resolve));
    send('Browser.close').catch(() => {});
    const kill = setTimeout(() => child.kill('SIGKILL'), 3000);
    await exited;
    clearTimeout(kill);
  }
  try {
    fs.rmSync(profile, { recursive: true, force: true, maxRetries: 5, retryDelay: 100 });
  } catch (e) {
    console.log(`NOTE ${profile} is left: ${e.message}`);
  }
  process.exit(rc);
}
setTimeout(
  () => quit(1, `RESULT FAIL no result in ${timeoutMs / 1000} s (the page's title: "${lastTitle}")`),
  timeoutMs,
).unref();

// ------------------------------------------------------------ the protocol

const toBrowser = child.stdio[3];
const fromBrowser = child.stdio[4];
toBrowser.on('error', () => {}); // the browser is gone: its exit says so
fromBrowser.on('error', () => {});
let nextId = 1;
const pending = new Map();
function send(method, params = {}, sessionId) {
  const id = nextId++;
  const msg = { id, method, params };
  if (sessionId) msg.sessionId = sessionId;
  toBrowser.write(`${JSON.stringify(msg)}\0`);
  return new Promise((resolve, reject) => pending.set(id, { resolve, reject, method }));
}
let inbuf = '';
fromBrowser.setEncoding('utf8');
fromBrowser.on('data', (d) => {
  inbuf += d;
  let at;
  while ((at = inbuf.indexOf('\0')) >= 0) {
    const msg = JSON.parse(inbuf.slice(0, at));
    inbuf = inbuf.slice(at + 1);
    const p = msg.id && pending.get(msg.id);
    if (!p) continue; // events: not needed
    pending.delete(msg.id);
    if (msg.error) p.reject(new Error(`${p.method}: ${msg.error.message}`));
    else p.resolve(msg.result);
  }
});

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const v = await send('Browser.getVersion');
  console.log(`BROWSER ${v.product}`);
  const { targetId } = await send('Target.createTarget', { url });
  const { sessionId } = await send('Target.attachToTarget', { targetId, flatten: true });
  if (opt.shot) {
    const size = { width: 1280, height: 900, deviceScaleFactor: 1, mobile: false };
    await send('Emulation.setDeviceMetricsOverride', size, sessionId);
  }
  const evaluate = async (expression) =>
    (await send('Runtime.evaluate', { expression, returnByValue: true }, sessionId)).result.value;
  // The page sets its title once its exchange is over; poll it.
  for (;;) {
    const title = String(await evaluate('document.title'));
    lastTitle = title;
    if (/^(PASS|FAIL)\b/.test(title)) {
      if (opt.shot && title.startsWith('PASS')) {
        const shot = await send('Page.captureScreenshot', { format: 'png' }, sessionId);
        fs.writeFileSync(opt.shot, Buffer.from(shot.data, 'base64'));
        console.log(`SHOT ${opt.shot}`);
      }
      const log = String((await evaluate("(document.getElementById('log') || {}).textContent || ''")) || '');
      for (const line of log.split('\n').filter(Boolean)) console.log(`PAGE ${line}`);
      quit(title.startsWith('PASS') ? 0 : 1, `RESULT ${title}`);
      return;
    }
    await sleep(50);
  }
}
main().catch((e) => quit(1, `RESULT FAIL ${e.message}`));
