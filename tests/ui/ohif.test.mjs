// The OHIF Viewer (npm @ohif/app, pinned by scripts/fetch-ohif.sh) served by
// Bastion at /viewer/, driven in Debian's chromium by playwright-core. Run by
// tests/interop/test_ohif.py, which starts `bastion serve --ohif-dir`, stores
// one study per kind of image and creates the clinician, then passes:
//   BASE_URL       https://localhost:PORT
//   UI_USER, UI_PASSWORD   a clinician
//   OHIF_CASES     JSON [{label, uid}]: the studies, by Study Instance UID
//   OUT_DIR        where screenshots and result.json go
// Checks: without a session /viewer/ sends the user to Bastion's login; after
// logging in to Bastion (session cookie, no token anywhere) the unfiltered
// worklist lists every study (no "Data Source Connection Error"); each study
// opens at /viewer/viewer?StudyInstanceUIDs=… and its viewport shows pixels
// (not one flat colour); no Content-Security-Policy violation on any page.
import { join } from 'node:path';
import { OUT, check, launch, login, newPage, onFailure, writeResults } from './lib.mjs';

const BASE = process.env.BASE_URL;
const USER = process.env.UI_USER;
const PASSWORD = process.env.UI_PASSWORD;
const CASES = JSON.parse(process.env.OHIF_CASES || '[]');

/** Statistics of a PNG screenshot (a Buffer), computed in the page: the
 * share of pixels away from the most common grey level, and how many grey
 * levels there are. */
async function pngStats(page, png) {
  return page.evaluate(async (b64) => {
    const img = new Image();
    img.src = `data:image/png;base64,${b64}`;
    await img.decode();
    const c = document.createElement('canvas');
    c.width = img.naturalWidth;
    c.height = img.naturalHeight;
    const g = c.getContext('2d');
    g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, c.width, c.height).data;
    const hist = new Array(256).fill(0);
    for (let i = 0; i < d.length; i += 4) {
      hist[Math.round(0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2])] += 1;
    }
    const total = d.length / 4;
    const mode = hist.indexOf(Math.max(...hist));
    let away = 0;
    for (let v = 0; v < 256; v++) if (Math.abs(v - mode) > 6) away += hist[v];
    return { away: away / total, levels: hist.filter((n) => n > 0).length, width: c.width, height: c.height };
  }, png.toString('base64'));
}

/** Waits (at most 45 s) until the first viewport's canvas, overlays hidden,
 * shows an image; returns its statistics (the last ones seen otherwise). */
async function viewportStats(page) {
  let stats = null;
  const deadline = Date.now() + 45000;
  while (Date.now() < deadline) {
    const skip = await page.$('text=Skip all');
    if (skip) await skip.click().catch(() => {});
    const canvas = await page.$('canvas.cornerstone-canvas');
    if (canvas) {
      // Overlay text (dates, window values) is not the image: hidden
      // through the CSSOM, which the policy allows.
      await page.evaluate(() => document.querySelectorAll('.viewport-overlay')
        .forEach((e) => { e.style.visibility = 'hidden'; }));
      const png = await canvas.screenshot().catch(() => null);
      if (png) {
        stats = await pngStats(page, png);
        if (stats.away > 0.02 && stats.levels > 8) return stats;
      }
    }
    await page.waitForTimeout(1000);
  }
  return stats;
}

const browser = await launch();
let page = null;
try {
  // -- without a session: sent to Bastion's login page
  const anon = await newPage(browser);
  const resp = await anon.page.goto(`${BASE}/viewer/`);
  const csp = resp.headers()['content-security-policy'] || '';
  check('GET /viewer/ is OHIF with its own strict CSP', resp.status() === 200
    && csp.includes("'wasm-unsafe-eval'") && !csp.includes("'unsafe-eval'")
    && !csp.includes("'unsafe-inline'") && csp.includes("worker-src 'self' blob:"), csp);
  await anon.page.waitForURL((u) => !u.pathname.startsWith('/viewer'), { timeout: 30000 });
  await anon.page.waitForSelector('#login-view:not([hidden])');
  check('no session: /viewer/ sends the user to Bastion\'s login', new URL(anon.page.url()).pathname === '/');
  await anon.context.close();

  // -- log in to Bastion, then the worklist, unfiltered
  ({ page } = await newPage(browser));
  await page.goto(`${BASE}/`);
  await page.waitForSelector('#login-view:not([hidden])');
  await login(page, USER, PASSWORD, '#list-view:not([hidden])');
  // -- the built-in study list's "Open in OHIF"
  await page.waitForSelector('#studies tbody tr a.ohif-link');
  const links = await page.locator('#studies tbody tr a.ohif-link').count();
  check('study list: an "Open in OHIF" link per study', links === CASES.length, links);
  const first = page.locator('#studies tbody tr a.ohif-link').first();
  const href = await first.getAttribute('href');
  await first.click();
  await page.waitForURL((u) => u.pathname === '/viewer/viewer', { timeout: 30000 });
  const opened = await viewportStats(page);
  check('"Open in OHIF" opens that study in OHIF', /^\/viewer\/viewer\?StudyInstanceUIDs=[0-9.]+$/.test(href)
    && opened && opened.away > 0.02, { href, opened });
  await page.screenshot({ path: join(OUT, 'open-in-ohif.png') });
  await page.goto(`${BASE}/viewer/`);
  await page.waitForSelector('text=/\\d+-\\d+ of \\d+/', { timeout: 60000 });
  // OHIF draws "0-0 of 0" before its QIDO-RS answer arrives: wait (bounded)
  // for a non-zero total, then check the number itself.
  await page.waitForFunction(() => /\d+-\d+ of [1-9]/.test(document.body.innerText),
    null, { timeout: 60000, polling: 250 }).catch(() => null);
  const paging = await page.textContent('text=/\\d+-\\d+ of \\d+/');
  const m = /(\d+)-(\d+) of (\d+)/.exec(paging);
  check('worklist lists every study', m && Number(m[3]) === CASES.length, paging);
  check('worklist: no data source error',
    !(await page.isVisible('text=Data Source Connection Error')));
  await page.screenshot({ path: join(OUT, 'worklist.png') });
  const violations = await page.evaluate(() => window.__csp);

  // -- every study, in the viewer
  for (const c of CASES) {
    await page.goto(`${BASE}/viewer/viewer?StudyInstanceUIDs=${c.uid}`);
    const stats = await viewportStats(page);
    await page.screenshot({ path: join(OUT, `${c.label}.png`) });
    check(`${c.label}: the viewport shows an image`, stats && stats.away > 0.02 && stats.levels > 8, stats);
    violations.push(...await page.evaluate(() => window.__csp));
  }
  violations.push(...page.consoleErrors.filter((t) => /Content Security Policy|Refused to/i.test(t)));
  check('no CSP violation on any page', violations.length === 0, violations.slice(0, 5));
  const stored = await page.evaluate(() => Object.keys(localStorage).concat(Object.keys(sessionStorage))
    .filter((k) => /token|auth|bearer/i.test(k)));
  check('no token kept by the viewer (session cookie only)', stored.length === 0, stored);
} catch (e) {
  await onFailure(page, e);
  writeResults();
  await browser.close();
  process.exit(1);
}
writeResults();
await browser.close();
