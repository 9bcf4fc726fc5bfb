import { chromium } from 'playwright-core';
const base = process.env.BASE_URL;
const studies = process.env.STUDIES.split(',').slice(0,1);
const browser = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--headless','--no-sandbox','--disable-gpu'] });
const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } });
const page = await context.newPage();
const logs = [];
page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') logs.push(`${m.type()}: ${m.text()}`); });
page.on('pageerror', (e) => logs.push(`pageerror: ${e.message}`));
page.on('response', (r) => { if (r.status() >= 400) logs.push(`HTTP ${r.status()} ${r.url()}`); });
await page.addInitScript(() => {
  window.__csp = [];
  document.addEventListener('securitypolicyviolation', (e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI} ${e.sample}`));
});
await page.goto(base + '/');
await page.fill('#login-username', 'reader');
await page.fill('#login-password', 'Correct-Horse-Battery-9');
await page.click('#login-submit');
await page.waitForTimeout(2000);
let i = 0;
for (const s of studies) {
  await page.goto(base + '/viewer/viewer?StudyInstanceUIDs=' + s);
  await page.waitForTimeout(12000);
  await page.screenshot({ path: `/tmp/ohifx/study${i++}.png` });
}
console.log(logs.slice(0, 40).join('\n'));
console.log('STYLES:', JSON.stringify(await page.evaluate(() => [...document.querySelectorAll('style')].map(e => (e.id||'') + ' ' + (e.getAttribute('data-emotion')||'') + ' ' + e.textContent.slice(0,300))), null, 1));
console.log('CSP:', JSON.stringify(await page.evaluate(() => window.__csp), null, 1));
await browser.close();
