// Shared pieces of the browser tests: the checks and their record, Debian's
// chromium launched by playwright-core (never a downloaded browser), page
// setup that collects console errors and CSP violations, pixel statistics
// of the viewer's image, a login that waits out the server's back-off, and
// RFC 6238 TOTP codes (the test computes what an authenticator app shows).
import { chromium } from 'playwright-core';
import { createHmac } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export const OUT = process.env.OUT_DIR || '.';
mkdirSync(OUT, { recursive: true });

export const results = [];

/** Records a check; throws (ending the run) when it failed. */
export function check(name, ok, detail) {
  results.push({ name, ok: Boolean(ok), detail: detail === undefined ? null : detail });
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${name}${detail === undefined ? '' : ` — ${JSON.stringify(detail)}`}`);
  if (!ok) throw new Error(`check failed: ${name}`);
}

/** Debian's chromium, headless, with the flags this closed network needs. */
export async function launch() {
  return chromium.launch({
    executablePath: '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
    timeout: 60000,
  });
}

/** A new context and page; `page.consoleErrors` collects errors, and
 * `window.__csp` the CSP violations seen by the page. */
export async function newPage(browser, viewport) {
  const context = await browser.newContext({
    ignoreHTTPSErrors: true, // the server's certificate is from the test's own CA
    viewport: viewport || { width: 1280, height: 800 },
    acceptDownloads: true,
  });
  const page = await context.newPage();
  page.setDefaultTimeout(20000);
  page.consoleErrors = [];
  page.on('console', (m) => { if (m.type() === 'error') page.consoleErrors.push(m.text()); });
  page.on('pageerror', (e) => page.consoleErrors.push(`pageerror: ${e.message}`));
  await page.addInitScript(() => {
    window.__csp = [];
    document.addEventListener('securitypolicyviolation',
      (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));
  });
  return { context, page };
}

/** Pixel statistics of the viewer's <img>, drawn into a canvas (a
 * same-origin blob: URL, so the canvas is readable). */
export async function imageStats(page) {
  return page.evaluate(() => {
    const img = document.getElementById('image');
    const c = document.createElement('canvas');
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
    const g = c.getContext('2d');
    g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, c.width, c.height).data;
    let min = 255; let max = 0; let sum = 0; let hash = 0;
    for (let i = 0; i < d.length; i += 4) {
      const v = d[i];
      if (v < min) min = v;
      if (v > max) max = v;
      sum += v;
      hash = (hash * 31 + v) >>> 0;
    }
    return {
      width: img.naturalWidth, height: img.naturalHeight, min, max,
      mean: sum / (d.length / 4), hash, src: img.dataset.src || '',
    };
  });
}

/** Waits until the viewer shows a loaded image other than `previousSrc`. */
export async function waitImage(page, previousSrc) {
  await page.waitForFunction((prev) => {
    const img = document.getElementById('image');
    return !img.hidden && img.complete && img.naturalWidth > 0 && (img.dataset.src || '') !== prev;
  }, previousSrc, { timeout: 20000 });
}

/** Submits the login form until `doneSelector` shows, waiting out a 429
 * back-off (at most 4 tries). */
export async function login(page, user, password, doneSelector, totp) {
  await page.fill('#login-username', user);
  for (let attempt = 0; attempt < 4; attempt++) {
    await page.fill('#login-password', password);
    await page.fill('#login-totp', totp ? totp() : '');
    await page.click('#login-submit');
    await page.waitForSelector(`${doneSelector}, #login-error:not([hidden])`);
    if (await page.isVisible(doneSelector)) return;
    const text = await page.textContent('#login-error');
    const m = /Try again in (\d+) second/.exec(text);
    if (!m) throw new Error(`login of ${user} failed: ${text}`);
    console.log(`note: throttled: ${text}`);
    await page.evaluate(() => { document.getElementById('login-error').hidden = true; });
    await page.waitForTimeout(Number(m[1]) * 1000 + 300);
  }
  await page.waitForSelector(doneSelector);
}

function base32(s) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = 0; let acc = 0; const out = [];
  for (const ch of s.replace(/[\s=]/g, '').toUpperCase()) {
    const v = alphabet.indexOf(ch);
    if (v < 0) throw new Error('bad base32');
    acc = (acc << 5) | v;
    bits += 5;
    if (bits >= 8) {
      bits -= 8;
      out.push((acc >> bits) & 0xff);
    }
  }
  return Buffer.from(out);
}

/** The 30-second time step of `ms` (Unix milliseconds). */
export const totpStep = (ms) => Math.floor(ms / 30000);

/** RFC 6238 TOTP (SHA-1, 6 digits, 30 s) of a base32 secret at `step`. */
export function totpCode(secret, step) {
  const msg = Buffer.alloc(8);
  msg.writeBigUInt64BE(BigInt(step));
  const h = createHmac('sha1', base32(secret)).update(msg).digest();
  const o = h[h.length - 1] & 0xf;
  const n = ((h[o] & 0x7f) << 24) | (h[o + 1] << 16) | (h[o + 2] << 8) | h[o + 3];
  return String(n % 1000000).padStart(6, '0');
}

/** No CSP violation and no console error but the expected statuses. */
export async function checkConsole(page, name, allowed) {
  const violations = await page.evaluate(() => window.__csp);
  const cspConsole = page.consoleErrors.filter((t) => /Content Security Policy|Refused to/i.test(t));
  check(`${name}: no CSP violation`, violations.length === 0 && cspConsole.length === 0, { violations, cspConsole });
  const other = page.consoleErrors.filter((t) => !(allowed || /status of 4(01|22|29)/).test(t));
  check(`${name}: no unexpected console error`, other.length === 0, other);
}

/** Screenshot and visible messages of a failed run. */
export async function onFailure(page, e) {
  console.log(`error: ${e.stack || e}`);
  if (!page) return;
  await page.screenshot({ path: join(OUT, 'failure.png') }).catch(() => {});
  const shown = await page.evaluate(() => [...document.querySelectorAll('.error, .notice')]
    .filter((el) => !el.hidden).map((el) => el.textContent)).catch(() => []);
  console.log(`messages on the page: ${JSON.stringify(shown)}`);
}

/** Writes result.json. */
export function writeResults() {
  writeFileSync(join(OUT, 'result.json'), JSON.stringify(results, null, 2));
}
