// The administration and security side of the web UI, and the viewer's
// tools, in Debian's chromium driven by playwright-core. Run by
// tests/interop/test_ui.py, which starts `bastion serve` (fresh `init`),
// stores a CT study (2 instances) and an MR study, creates the users, then
// passes:
//   BASE_URL, HTTP_PORT        https://localhost:PORT and PORT
//   ADMIN_PASSWORD             the initial admin password printed by init
//   READER, READER_PASSWORD    a clinician; TECH, TECH_PASSWORD a technologist;
//   AUDITOR, AUDITOR_PASSWORD  an auditor
//   CT_STUDY                   the CT's Study Instance UID
//   OUT_DIR                    where screenshots, study.zip and result.json go
// Exit code 0 when every check held; the checks are printed one per line.
import { readFileSync } from 'node:fs';
import https from 'node:https';
import { join } from 'node:path';
import {
  OUT, check, checkConsole, imageStats, launch, login, newPage, onFailure, totpCode, totpStep,
  waitImage, writeResults,
} from './lib.mjs';

const env = process.env;
const BASE = env.BASE_URL;
const ADMIN_NEW = 'an administrator passphrase for the archive 9';
const ALLOWED_ERRORS = /status of 4(01|03|22|29)/;

// Failed logins for an unknown account from 127.0.0.2 (a loopback address of
// its own, so that the per-address back-off does not slow the test's other
// logins from 127.0.0.1).
function failedLogin() {
  return new Promise((resolve, reject) => {
    const body = JSON.stringify({ username: 'mallory', password: 'guess-123456' });
    const req = https.request({
      host: '127.0.0.1', port: Number(env.HTTP_PORT), path: '/api/login', method: 'POST',
      localAddress: '127.0.0.2', rejectUnauthorized: false, timeout: 20000,
      headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) },
    }, (res) => { res.resume(); res.on('end', () => resolve(res.statusCode)); });
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.end(body);
  });
}

// Names of the entries of a zip, from its central directory.
function zipNames(buf) {
  const names = [];
  let eocd = -1;
  for (let i = buf.length - 22; i >= Math.max(0, buf.length - 65557); i--) {
    if (buf.readUInt32LE(i) === 0x06054b50) { eocd = i; break; }
  }
  if (eocd < 0) return null;
  let p = buf.readUInt32LE(eocd + 16);
  const n = buf.readUInt16LE(eocd + 10);
  for (let k = 0; k < n && p + 46 <= buf.length; k++) {
    if (buf.readUInt32LE(p) !== 0x02014b50) return null;
    const nameLen = buf.readUInt16LE(p + 28);
    const extra = buf.readUInt16LE(p + 30);
    const comment = buf.readUInt16LE(p + 32);
    names.push(buf.subarray(p + 46, p + 46 + nameLen).toString('utf8'));
    p += 46 + nameLen + extra + comment;
  }
  return names;
}

// Confirms the next dialog: waits for a showing newer than the last one
// confirmed (two can follow each other), clicks Confirm, waits for it to close.
let dialogsConfirmed = 0;
async function confirmDialog(page) {
  await page.waitForFunction((n) => {
    const d = document.getElementById('confirm');
    return d.open && Number(d.dataset.shown || 0) > n;
  }, dialogsConfirmed);
  dialogsConfirmed = Number(await page.getAttribute('#confirm', 'data-shown'));
  const text = await page.textContent('#confirm-text');
  await page.click('#confirm-yes');
  await page.waitForFunction((n) => {
    const d = document.getElementById('confirm');
    return !d.open || Number(d.dataset.shown || 0) > n;
  }, dialogsConfirmed);
  return text;
}

async function openCt(page) {
  await page.waitForSelector('#studies tbody tr');
  await page.click('#studies tbody tr:has(td:text-is("CT"))');
  await page.waitForSelector('#viewer-view:not([hidden])');
  await waitImage(page, '');
}

const browser = await launch();
let failed = false;
let page = null;
try {
  // ---- the initial admin: TOTP enrolment, then the forced password change
  const admin = await newPage(browser);
  page = admin.page;
  await page.goto(`${BASE}/`);
  await page.waitForSelector('#login-view:not([hidden])');
  await page.fill('#login-username', 'admin');
  await page.fill('#login-password', env.ADMIN_PASSWORD);
  await page.click('#login-submit');
  await page.waitForSelector('#totp-view:not([hidden])');
  await page.waitForFunction(() => document.getElementById('totp-qr').naturalWidth > 0);
  const secret = await page.getAttribute('#totp-secret', 'data-secret');
  check('initial admin: TOTP enrolment shows a QR code and a 160-bit key',
    /^[A-Z2-7]{32}$/.test(secret || ''), secret && secret.length);
  await page.screenshot({ path: join(OUT, 'totp.png') });
  // The key stays inside its card, at desktop and at phone width.
  // (One box: an inline box split over two lines loses its right border
  // at the card's edge and its left padding on the next line.)
  const keyOverflow = async () => page.evaluate(() => {
    const el = document.getElementById('totp-secret');
    const key = el.getBoundingClientRect();
    const card = document.getElementById('totp-view');
    const box = card.getBoundingClientRect();
    const pad = parseFloat(getComputedStyle(card).paddingRight) || 0;
    const fragments = el.getClientRects().length - 1;
    return Math.max(0, Math.ceil(key.right - (box.right - pad)), card.scrollWidth - card.clientWidth)
      + fragments * 100;
  });
  const keyWide = await keyOverflow();
  await page.setViewportSize({ width: 320, height: 700 });
  const keyNarrow = await keyOverflow();
  await page.screenshot({ path: join(OUT, 'totp-phone.png') });
  await page.setViewportSize({ width: 1280, height: 800 });
  check('TOTP enrolment: the key stays inside its card (desktop, phone)', keyWide <= 1 && keyNarrow <= 1,
    { keyWide, keyNarrow });
  await page.fill('#totp-code', '000000' === totpCode(secret, totpStep(Date.now())) ? '111111' : '000000');
  await page.click('#totp-submit');
  await page.waitForSelector('#totp-error:not([hidden])');
  check('TOTP enrolment: a wrong code is refused', (await page.textContent('#totp-error')).includes('not accepted'));
  // The wrong code earned a back-off: retry when told to, with a fresh code.
  let enrolStep = 0;
  for (let attempt = 0; attempt < 4; attempt++) {
    await page.evaluate(() => { document.getElementById('totp-error').hidden = true; });
    enrolStep = totpStep(Date.now());
    await page.fill('#totp-code', totpCode(secret, enrolStep));
    await page.click('#totp-submit');
    await page.waitForSelector('#password-view:not([hidden]), #totp-error:not([hidden])');
    if (await page.isVisible('#password-view')) break;
    const text = await page.textContent('#totp-error');
    const m = /Try again in (\d+) second/.exec(text);
    if (!m) throw new Error(`enrolment refused: ${text}`);
    await page.waitForTimeout(Number(m[1]) * 1000 + 300);
  }
  await page.waitForSelector('#password-view:not([hidden])');
  check('TOTP enrolment: accepted, then the password change is asked', true);
  await page.fill('#password-old', env.ADMIN_PASSWORD);
  await page.fill('#password-new', ADMIN_NEW);
  await page.fill('#password-again', ADMIN_NEW);
  // The second factor was proven in this login flow: the change keeps the
  // admin logged in (a new session), no second code and no wait for the
  // next 30-second step.
  const loginShown = await page.evaluate(() => {
    // Any moment the login page shows between the click and the list.
    window.loginShown = false;
    const view = document.getElementById('login-view');
    new MutationObserver(() => { if (!view.hidden) window.loginShown = true; })
      .observe(view, { attributes: true, attributeFilter: ['hidden'] });
    return window.loginShown;
  });
  await page.click('#password-form button[type=submit]');
  await page.waitForSelector('#list-view:not([hidden])');
  check('password changed: still logged in, no login page and no second code asked',
    !loginShown && !(await page.evaluate(() => window.loginShown)));
  check('password changed: the session is the admin\'s',
    (await page.textContent('#who')) === 'admin');
  const nav = await page.locator('#nav a:visible').allTextContents();
  check('admin: every page in the navigation', nav.join(',') === 'Studies,Devices,Users,Alerts,Audit,Posture', nav);

  // ---- a clinician: window by dragging, zoom, download
  const reader = await newPage(browser);
  page = reader.page;
  await page.goto(`${BASE}/`);
  await login(page, env.READER, env.READER_PASSWORD, '#list-view:not([hidden])');
  await openCt(page);
  const before = await imageStats(page);
  // The window the server applied (CT_small has none in its header: the
  // pixel range): the drag must start from it, not from a guess.
  const applied = await page.evaluate(async (src) => {
    const r = await fetch(src, { headers: { Accept: 'image/png' } });
    return r.headers.get('X-Bastion-Window');
  }, before.src);
  const [c0, w0] = applied.split(',').map(Number);
  const unit = Math.max(1, w0 / 256);
  const box = await page.locator('#stage').boundingBox();
  const cx = box.x + box.width / 2;
  const cy = box.y + box.height / 2;
  await page.mouse.move(cx, cy);
  await page.mouse.down();
  await page.mouse.move(cx + 40, cy - 30, { steps: 4 });
  await page.mouse.move(cx + 80, cy - 60, { steps: 4 });
  await page.mouse.up();
  await page.waitForFunction(() => (document.getElementById('image').dataset.src || '').includes('window='));
  await page.waitForTimeout(500);
  await waitImage(page, before.src);
  const dragged = await imageStats(page);
  const ww = await page.textContent('#ov-window');
  check('drag: the window follows the mouse and the pixels change',
    dragged.src.includes('window=') && dragged.hash !== before.hash && /^W \d+ \/ L -?\d+/.test(ww),
    { src: dragged.src, overlay: ww, before: before.mean, after: dragged.mean });
  const [, w1, c1] = /^W (\d+) \/ L (-?\d+)/.exec(ww).map(Number);
  check('drag: starts from the window the server applied (80 px right, 60 px up)',
    Math.abs(w1 - (w0 + 80 * unit)) <= 3 * unit && Math.abs(c1 - (c0 - 60 * unit)) <= 3 * unit,
    { applied, unit, now: [c1, w1] });
  await page.click('#zoom-in');
  await page.click('#zoom-in');
  const transform = await page.$eval('#image', (img) => img.style.transform);
  check('zoom: the image is scaled', transform.includes('scale(1.5625)'), transform);
  await page.click('#tool-pan');
  await page.mouse.move(cx, cy);
  await page.mouse.down();
  await page.mouse.move(cx + 50, cy + 20, { steps: 3 });
  await page.mouse.up();
  const panned = await page.$eval('#image', (img) => img.style.transform);
  check('pan: the image moves with the mouse', panned.includes('translate(50px, 20px)'), panned);
  await page.screenshot({ path: join(OUT, 'viewer-tools.png') });
  check('download: offered to a clinician', await page.isVisible('#download'));
  const downloading = page.waitForEvent('download');
  await page.click('#download');
  const download = await downloading;
  const zipPath = join(OUT, 'study.zip');
  await download.saveAs(zipPath);
  const zip = readFileSync(zipPath);
  const names = zipNames(zip) || [];
  check('download: a zip of the two CT instances as Part 10 files',
    zip.subarray(0, 4).toString('latin1') === 'PK\u0003\u0004' && names.length === 2
      && names.every((n) => /^[0-9.]+\/[0-9.]+\.dcm$/.test(n)), names);
  await checkConsole(page, 'clinician', ALLOWED_ERRORS);

  // ---- the same clinician on a tablet
  const tablet = await newPage(browser, { width: 768, height: 1024 });
  page = tablet.page;
  await page.goto(`${BASE}/`);
  await login(page, env.READER, env.READER_PASSWORD, '#list-view:not([hidden])');
  await page.waitForSelector('#studies tbody tr');
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check('tablet: the study list fits the width', overflow <= 1, overflow);
  await page.screenshot({ path: join(OUT, 'tablet-studies.png') });
  await openCt(page);
  const small = await imageStats(page);
  check('tablet: the viewer shows the CT', small.width === 128 && small.max - small.min > 50, small);
  await page.screenshot({ path: join(OUT, 'tablet-viewer.png') });

  // ---- a technologist may view but not export
  const tech = await newPage(browser);
  page = tech.page;
  await page.goto(`${BASE}/`);
  await login(page, env.TECH, env.TECH_PASSWORD, '#list-view:not([hidden])');
  await openCt(page);
  check('technologist: no download button', !(await page.isVisible('#download')));
  const refused = await page.evaluate(async (uid) => (await fetch(`/api/studies/${uid}/export`)).status, env.CT_STUDY);
  check('technologist: the export is refused (403)', refused === 403, refused);
  await page.click('#change-password');
  await page.waitForSelector('#password-view:not([hidden])');
  check('change password: not presented as forced', !(await page.isVisible('#password-forced')));
  const techNew = 'a technologist passphrase of my own 4';
  await page.fill('#password-old', env.TECH_PASSWORD);
  await page.fill('#password-new', techNew);
  await page.fill('#password-again', techNew);
  await page.click('#password-form button[type=submit]');
  await page.waitForSelector('#login-view:not([hidden])');
  check('change password: then log in again', (await page.textContent('#login-notice')).includes('Password changed'));
  await login(page, env.TECH, techNew, '#list-view:not([hidden])');

  // ---- an auditor sees alerts and audit, never images
  const auditor = await newPage(browser);
  page = auditor.page;
  await page.goto(`${BASE}/`);
  await login(page, env.AUDITOR, env.AUDITOR_PASSWORD, '#alerts-view:not([hidden])');
  const auditorNav = await page.locator('#nav a:visible').allTextContents();
  check('auditor: only Alerts and Audit in the navigation', auditorNav.join(',') === 'Alerts,Audit', auditorNav);
  await page.goto(`${BASE}/#/studies`);
  await page.waitForSelector('#list-error:not([hidden])');
  check('auditor: the studies page says no access', (await page.textContent('#list-error')).includes('does not give access'));
  const statuses = await page.evaluate(async (uid) => Promise.all([
    fetch('/dicomweb/studies').then((r) => r.status),
    fetch(`/dicomweb/studies/${uid}/metadata`, { headers: { Accept: 'application/dicom+json' } }).then((r) => r.status),
    fetch(`/api/studies/${uid}/export`).then((r) => r.status),
  ]), env.CT_STUDY);
  check('auditor: search, metadata and export all refused (403)', statuses.every((s) => s === 403), statuses);
  await page.screenshot({ path: join(OUT, 'auditor.png') });
  await checkConsole(page, 'auditor', ALLOWED_ERRORS);

  // ---- a brute force from another address raises an alert
  const codes = [];
  for (let i = 0; i < 6; i++) codes.push(await failedLogin());
  check('brute force: six failed logins refused', codes.every((c) => c === 401 || c === 429), codes);

  // ---- the admin's pages
  page = admin.page;
  await page.goto(`${BASE}/#/alerts`);
  let found = false;
  for (let i = 0; i < 30 && !found; i++) {
    await page.waitForSelector('#alerts-view:not([hidden])');
    await page.waitForTimeout(300);
    found = await page.isVisible('#alerts tbody tr[data-rule="login_brute_force"]');
    if (!found) {
      await page.uncheck('#alerts-all');
      await page.check('#alerts-all');
    }
  }
  check('alerts: the brute force is listed', found);
  await page.click('#alerts tbody tr[data-rule="login_brute_force"]');
  await page.waitForSelector('#alert-detail:not([hidden])');
  await page.waitForSelector('#evidence tbody tr');
  const evidence = await page.locator('#evidence tbody tr').allTextContents();
  check('alerts: the evidence lists the failed logins', evidence.length >= 5
    && evidence.filter((t) => t.includes('login')).length >= 5, evidence.length);
  await page.screenshot({ path: join(OUT, 'alerts.png') });
  await page.fill('#ack-comment', 'test run: scripted failed logins from 127.0.0.2');
  await page.click('#ack-submit');
  await page.waitForSelector('#ack-done:not([hidden])');
  const facts = await page.textContent('#alert-facts');
  check('alerts: acknowledged with a comment', facts.includes('Statusacknowledged')
    && facts.includes('scripted failed logins') && !(await page.isVisible('#ack-form')), facts);
  await page.check('#alerts-all');
  await page.waitForSelector(`#alerts tbody tr[data-rule="login_brute_force"] td:text-is("acknowledged")`);
  // Bulk acknowledgement: the button is there while alerts are open and
  // acknowledges every open one; with none open it is hidden.
  const openRows = async () => (await page.locator('#alerts tbody tr td:nth-child(4)').allTextContents())
    .filter((t) => t === 'open').length;
  if (await openRows() > 0) {
    check('alerts: bulk acknowledgement offered while alerts are open', await page.isVisible('#ack-all-form'));
    await page.fill('#ack-all-comment', 'test run: everything reviewed');
    await page.click('#ack-all-submit');
    await page.waitForSelector('#ack-all-done:not([hidden])');
    const done = await page.textContent('#ack-all-done');
    check('alerts: bulk acknowledgement done', /^\d+ alert\(s\) acknowledged\.$/.test(done) && await openRows() === 0, done);
  }
  check('alerts: no bulk acknowledgement without open alerts', !(await page.isVisible('#ack-all-form')));

  await page.goto(`${BASE}/#/audit`);
  await page.waitForFunction(() => /intact|damaged|could not/.test(document.getElementById('chain-status').textContent));
  const chain = await page.textContent('#chain-status');
  check('audit: the chain is verified intact', chain.startsWith('Audit trail intact'), chain);
  await page.fill('#a-user', env.READER);
  await page.click('#audit-search');
  await page.waitForFunction(() => document.querySelectorAll('#audit tbody tr').length > 0);
  const trail = await page.locator('#audit tbody tr').allTextContents();
  check('audit: the clinician\'s viewing and export are in the trail',
    trail.some((t) => t.includes('export.study')) && trail.some((t) => t.includes('wado.')), trail.length);
  await page.screenshot({ path: join(OUT, 'audit.png') });

  await page.goto(`${BASE}/#/devices`);
  await page.waitForSelector('#devices tbody tr[data-ae="MODALITY"]');
  const modality = await page.textContent('#devices tbody tr[data-ae="MODALITY"]');
  check('devices: the inventory shows what the modality\'s images say', modality.includes('TOSHIBA_MEC')
    && modality.includes('MRT50H1'), modality);
  const dx = await page.textContent('#devices tbody tr[data-ae="PORTABLE_DX"] td:nth-child(7)');
  check('devices: the last refused association of a registered device', dx.length > 10, dx);
  const unknown = await page.locator('#unknown tbody tr').allTextContents();
  check('devices: unknown AE titles that tried', unknown.some((t) => t.includes('STRANGER')), unknown);
  await page.click('#device-new');
  await page.fill('#dev-ae', 'CT_SCANNER');
  await page.fill('#dev-network', '127.0.0.1/32');
  await page.selectOption('#dev-transport', 'tls');
  await page.check('#device-form .perms input[value="store"]');
  await page.click('#device-save');
  check('devices: adding asks for confirmation', (await confirmDialog(page)).includes('CT_SCANNER'));
  await page.waitForSelector('#devices tbody tr[data-ae="CT_SCANNER"]');
  await page.click('#devices tbody tr[data-ae="CT_SCANNER"] button:text-is("Edit")');
  await page.check('#device-form .perms input[value="find"]');
  await page.fill('#dev-host', '127.0.0.1');
  await page.fill('#dev-port', '11112');
  await page.click('#device-save');
  await confirmDialog(page);
  const deviceHost = async () => page.evaluate(async () => {
    const list = await (await fetch('/api/devices')).json();
    const d = list.find((x) => x.ae === 'CT_SCANNER');
    return [d.host, d.port];
  });
  await page.waitForFunction(() => document.getElementById('devices-notice').textContent.includes('changed'));
  check('devices: host and port set', JSON.stringify(await deviceHost()) === '["127.0.0.1",11112]', await deviceHost());
  await page.click('#devices tbody tr[data-ae="CT_SCANNER"] button:text-is("Edit")');
  await page.fill('#dev-host', '');
  await page.fill('#dev-port', '');
  await page.evaluate(() => { document.getElementById('devices-notice').hidden = true; });
  await page.click('#device-save');
  await confirmDialog(page);
  await page.waitForSelector('#devices-notice:not([hidden])');
  check('devices: emptied host and port are cleared', JSON.stringify(await deviceHost()) === '[null,null]', await deviceHost());
  await page.waitForFunction(() => {
    const tr = document.querySelector('#devices tbody tr[data-ae="CT_SCANNER"]');
    return tr && tr.children[3].textContent === 'echo, store, find';
  });
  check('devices: edited (find added)', true);
  await page.click('#device-new');
  await page.fill('#dev-ae', 'ANYWHERE');
  await page.fill('#dev-network', '0.0.0.0/0');
  await page.click('#device-save');
  await page.waitForSelector('#confirm[open]');
  const wide = await page.textContent('#confirm-text');
  await page.click('#confirm-no');
  check('devices: a network of any address is warned about, and cancelled',
    wide.includes('any address') && !(await page.isVisible('#devices tbody tr[data-ae="ANYWHERE"]')), wide);
  dialogsConfirmed = Number(await page.getAttribute('#confirm', 'data-shown'));
  await page.click('#device-new');
  await page.fill('#dev-ae', 'OLD_US');
  await page.fill('#dev-network', '127.0.0.1/32');
  await page.selectOption('#dev-transport', 'plain');
  await page.click('#device-save');
  check('devices: a plain device is warned about', (await confirmDialog(page)).includes('unencrypted'));
  await confirmDialog(page);
  await page.waitForSelector('#devices tbody tr[data-ae="OLD_US"]');
  check('devices: the plain device is marked', (await page.textContent('#devices tbody tr[data-ae="OLD_US"]')).includes('unencrypted'));
  await page.screenshot({ path: join(OUT, 'devices.png') });
  await page.click('#devices tbody tr[data-ae="OLD_US"] button:text-is("Remove")');
  await confirmDialog(page);
  await page.waitForSelector('#devices tbody tr[data-ae="OLD_US"]', { state: 'detached' });
  check('devices: removed after confirmation', true);

  await page.goto(`${BASE}/#/users`);
  await page.waitForSelector('#users tbody tr[data-user="admin"]');
  const adminRow = await page.textContent('#users tbody tr[data-user="admin"]');
  check('users: the admin has two-factor on', adminRow.includes('on'), adminRow);
  await page.click('#user-new');
  await page.fill('#user-name', 'carol');
  await page.selectOption('#user-role', 'clinician');
  await page.click('#user-save');
  await confirmDialog(page);
  await page.waitForSelector('#generated-password');
  const generated = await page.textContent('#generated-password');
  check('users: a generated password shown once', generated.length >= 12, generated.length);
  await page.waitForSelector('#users tbody tr[data-user="carol"]');
  await page.click('#users tbody tr[data-user="carol"] button:text-is("Disable")');
  await confirmDialog(page);
  await page.waitForFunction(() => (document.querySelector('#users tbody tr[data-user="carol"]') || {}).textContent?.includes('disabled'));
  check('users: carol disabled', true);
  await page.screenshot({ path: join(OUT, 'users.png') });

  await page.goto(`${BASE}/#/posture`);
  await page.waitForSelector('#posture-listeners tbody tr');
  const listeners = await page.locator('#posture-listeners tbody tr').allTextContents();
  const certs = await page.textContent('#posture-certs');
  check('posture: listeners and certificate expiry shown', listeners.length >= 2 && /days/.test(certs),
    { listeners, certs });
  const auditState = await page.textContent('#posture-audit');
  check('posture: audit recording state shown', /Audit trail\s*recording/.test(auditState) && /patient data is refused/.test(auditState),
    auditState);
  await page.screenshot({ path: join(OUT, 'posture.png') });

  // ---- the admin pages at tablet width: nothing wider than the screen
  await page.setViewportSize({ width: 768, height: 1024 });
  for (const [name, ready] of [['devices', '#devices tbody tr'], ['users', '#users tbody tr'],
    ['alerts', '#alerts-view:not([hidden])'], ['audit', '#audit tbody tr'], ['posture', '#posture-listeners tbody tr']]) {
    await page.goto(`${BASE}/#/${name}`);
    await page.waitForSelector(ready);
    await page.waitForTimeout(300);
    const wide = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    check(`tablet: the ${name} page fits the width`, wide <= 1, wide);
    if (name === 'devices' || name === 'audit') await page.screenshot({ path: join(OUT, `tablet-${name}.png`) });
  }
  await checkConsole(page, 'admin', ALLOWED_ERRORS);
} catch (e) {
  failed = true;
  await onFailure(page, e);
} finally {
  writeResults();
  await browser.close();
}
process.exit(failed ? 1 : 0);
