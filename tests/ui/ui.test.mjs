// Drives Debian's chromium (never a downloaded browser) through Bastion's
// web UI with playwright-core. Run by tests/interop/test_ui.py, which starts
// `bastion serve`, stores the studies and creates the user, then passes:
//   BASE_URL   https://localhost:PORT
//   UI_USER, UI_PASSWORD   a clinician
//   NEW_USER, NEW_PASSWORD   a clinician whose password was generated
//   OUT_DIR    where screenshots and result.json go
// Exit code 0 when every check held; the checks are printed one per line.
import { join } from 'node:path';
import {
  OUT, check, checkConsole, imageStats, launch, newPage, onFailure, waitImage, writeResults,
} from './lib.mjs';

const BASE = process.env.BASE_URL;
const USER = process.env.UI_USER;
const PASSWORD = process.env.UI_PASSWORD;
const NEW_USER = process.env.NEW_USER;
const NEW_PASSWORD = process.env.NEW_PASSWORD;

const browser = await launch();
let failed = false;
let page = null;
try {
  const opened = await newPage(browser);
  const { context } = opened;
  page = opened.page;

  // -- the page and its headers
  const resp = await page.goto(`${BASE}/`);
  const csp = resp.headers()['content-security-policy'] || '';
  check('GET / is 200 HTML', resp.status() === 200 && resp.headers()['content-type'].startsWith('text/html'));
  check('CSP header on /', csp.includes("script-src 'self'") && csp.includes("style-src 'self'") && !csp.includes('unsafe'), csp);
  await page.waitForSelector('#login-view:not([hidden])');

  // -- a wrong password is refused with a message
  await page.fill('#login-username', USER);
  await page.fill('#login-password', 'not the password');
  await page.click('#login-submit');
  await page.waitForSelector('#login-error:not([hidden])');
  const err = await page.textContent('#login-error');
  check('wrong password: message shown', /Log-in failed/.test(err), err);
  check('wrong password: still on the login page', await page.isVisible('#login-form'));
  await page.screenshot({ path: join(OUT, 'login.png') });

  // -- log in (after the back-off the failure earned: 429, Retry-After shown)
  let throttled = null;
  for (let attempt = 0; attempt < 4; attempt++) {
    await page.fill('#login-password', PASSWORD);
    await page.click('#login-submit');
    await page.waitForSelector('#list-view:not([hidden]), #login-error:not([hidden])');
    if (await page.isVisible('#list-view')) break;
    const text = await page.textContent('#login-error');
    const m = /Try again in (\d+) second/.exec(text);
    if (!m) break;
    throttled = text;
    await page.evaluate(() => { document.getElementById('login-error').hidden = true; });
    await page.waitForTimeout(Number(m[1]) * 1000 + 300);
  }
  if (throttled) console.log(`note: throttled once: ${throttled}`);
  await page.waitForSelector('#list-view:not([hidden])');
  await page.waitForSelector('#studies tbody tr');
  const rows = await page.locator('#studies tbody tr').count();
  check('logged in: the study list shows the stored studies', rows === 2, rows);
  check('logged in: the user is named in the bar', (await page.textContent('#who')) === USER);
  await page.screenshot({ path: join(OUT, 'studies.png') });

  // -- the list: newest first, accession and modality columns, sortable headers
  const headers = await page.locator('#studies thead th').allTextContents();
  check('list: accession and modality columns', headers.map((h) => h.trim()).includes('Accession')
    && headers.map((h) => h.trim()).includes('Modality'), headers);
  const dateColumn = async () => page.locator('#studies tbody tr td:nth-child(4)').allTextContents();
  const modalityColumn = async () => page.locator('#studies tbody tr td:nth-child(6)').allTextContents();
  const dates = await dateColumn();
  check('list: newest study first by default', dates.join() === '2004-08-26,2004-01-19', dates);
  check('list: the study date header says descending',
    (await page.getAttribute('#studies th[data-sort=date]', 'aria-sort')) === 'descending');
  await page.click('#studies th[data-sort=modality] button');
  check('sort: modality header orders A to Z', (await modalityColumn()).join() === 'CT,MR', await modalityColumn());
  check('sort: the modality header says ascending',
    (await page.getAttribute('#studies th[data-sort=modality]', 'aria-sort')) === 'ascending');
  await page.click('#studies th[data-sort=modality] button');
  check('sort: a second click reverses it', (await modalityColumn()).join() === 'MR,CT', await modalityColumn());
  await page.click('#studies th[data-sort=date] button');
  check('sort: study date again newest first', (await dateColumn()).join() === '2004-08-26,2004-01-19', await dateColumn());

  // -- search by modality
  await page.selectOption('#q-modality', 'CT');
  const searched = page.waitForResponse((r) => r.url().includes('/dicomweb/studies?') && r.url().includes('ModalitiesInStudy=CT'));
  await page.click('#search');
  const qido = await searched;
  check('search: QIDO-RS with limit and includefield', qido.status() === 200
    && qido.url().includes('limit=25') && qido.url().includes('includefield='), qido.url());
  await page.waitForFunction(() => document.querySelectorAll('#studies tbody tr').length === 1);
  const cells = await page.locator('#studies tbody tr td').allTextContents();
  check('search: one CT study with its columns', cells[5] === 'CT' && cells[8] === '2', cells);

  // -- the viewer; its URL names the study, and a reload opens it again
  const ctStudy = await page.getAttribute('#studies tbody tr', 'data-study');
  await page.click('#studies tbody tr');
  await page.waitForSelector('#viewer-view:not([hidden])');
  await waitImage(page, '');
  const url = new URL(page.url());
  check('viewer: the URL names the study', url.hash === `#/study/${ctStudy}` && ctStudy.length > 10, page.url());
  await page.reload();
  await page.waitForSelector('#viewer-view:not([hidden])');
  await waitImage(page, '');
  check('reload: the same study is open', new URL(page.url()).hash === `#/study/${ctStudy}`
    && (await page.textContent('#ov-patient')).includes('CT1'), page.url());
  const first = await imageStats(page);
  check('viewer: the CT is 128x128', first.width === 128 && first.height === 128, first);
  check('viewer: the image is not blank', first.max - first.min > 50, first);
  const thumbs = await page.locator('#series .thumb img').count();
  check('viewer: a series thumbnail', thumbs === 1, thumbs);
  await page.waitForFunction(() => {
    const t = document.querySelector('#series .thumb img');
    return t && t.complete && t.naturalWidth > 0;
  });
  check('viewer: overlay says image 1 of 2', (await page.textContent('#ov-position')).includes('image 1 of 2'));
  check('viewer: overlay names the patient', (await page.textContent('#ov-patient')).length > 0);

  // -- a window preset
  await page.click('#presets button:text-is("Lung")');
  await waitImage(page, first.src);
  const lung = await imageStats(page);
  check('preset: the image URL carries the window', lung.src.includes('window=-600%2C1500') || lung.src.includes('window=-600,1500'), lung.src);
  check('preset: the pixels changed', lung.hash !== first.hash && lung.width === 128, { first: first.mean, lung: lung.mean });
  await page.click('#presets button:text-is("Soft tissue")');
  await waitImage(page, lung.src);
  const soft = await imageStats(page);
  check('preset: soft tissue differs from lung', soft.hash !== lung.hash, { lung: lung.mean, soft: soft.mean });

  // -- next instance with the down arrow
  await page.keyboard.press('ArrowDown');
  await waitImage(page, soft.src);
  const second = await imageStats(page);
  check('arrow down: the next instance', (await page.textContent('#ov-position')).includes('image 2 of 2')
    && second.src !== soft.src && second.hash !== soft.hash, second.src);
  await page.screenshot({ path: join(OUT, 'viewer.png') });

  // -- a render failure is a message, never a blank page
  await page.route('**/rendered*', (route) => route.fulfill({
    status: 422, contentType: 'application/json', body: '{"error":"cannot decode","status":422}',
  }));
  await page.keyboard.press('ArrowUp');
  await page.waitForSelector('#cannot:not([hidden])');
  check('render failure: "cannot display this image"', (await page.textContent('#cannot')).includes('Cannot display this image'));
  await page.screenshot({ path: join(OUT, 'viewer-cannot.png') });
  await page.unroute('**/rendered*');
  // an image that truly cannot be shown: the server's reason, in plain words
  const reason = 'This image cannot be displayed: its picture data is damaged or does not match the image\'s description (size, colours). The rest of the study is not affected.';
  await page.route('**/rendered*', (route) => route.fulfill({
    status: 422, contentType: 'application/json',
    body: JSON.stringify({ error: 'cannot decompress: frame 1: codestream malformed', status: 422, reason }),
  }));
  await page.keyboard.press('ArrowDown');
  await page.waitForFunction((r) => document.querySelector('#cannot').textContent === r, reason);
  check('render failure: the server\'s reason is shown', (await page.textContent('#cannot')) === reason);
  await page.unroute('**/rendered*');

  // -- logout, then an expired session
  await page.click('#logout');
  await page.waitForSelector('#login-view:not([hidden])');
  check('logout: back at the login page', (await page.textContent('#login-notice')).includes('logged out'));
  await page.fill('#login-username', USER);
  await page.fill('#login-password', PASSWORD);
  await page.click('#login-submit');
  await page.waitForSelector('#list-view:not([hidden])');
  await context.clearCookies(); // the server forgets nothing; the browser loses its cookie
  await page.click('#search');
  await page.waitForSelector('#login-view:not([hidden])');
  check('expired session: back at the login page with a message',
    (await page.textContent('#login-notice')).includes('session has expired'));
  await page.screenshot({ path: join(OUT, 'expired.png') });

  // -- a generated password must be changed first
  await page.fill('#login-username', NEW_USER);
  await page.fill('#login-password', NEW_PASSWORD);
  await page.click('#login-submit');
  await page.waitForSelector('#password-view:not([hidden])');
  check('first login: the password change is asked', await page.isVisible('#password-form'));
  const chosen = 'a calm new passphrase for reading 7';
  await page.fill('#password-old', NEW_PASSWORD);
  await page.fill('#password-new', chosen);
  await page.fill('#password-again', `${chosen}x`);
  await page.click('#password-form button[type=submit]');
  await page.waitForSelector('#password-error:not([hidden])');
  check('password change: mismatch is caught', (await page.textContent('#password-error')).includes('differ'));
  await page.fill('#password-again', chosen);
  await page.screenshot({ path: join(OUT, 'password.png') });
  await page.click('#password-form button[type=submit]');
  await page.waitForSelector('#list-view:not([hidden])');
  check('password change: then logged in with the new password', (await page.textContent('#who')) === NEW_USER);
  await page.waitForSelector('#studies tbody tr');

  // -- no CSP violation anywhere
  await checkConsole(page, 'clinician');
} catch (e) {
  failed = true;
  await onFailure(page, e);
} finally {
  writeResults();
  await browser.close();
}
process.exit(failed ? 1 : 0);
