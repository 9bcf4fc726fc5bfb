// Bastion web UI: login (with TOTP and its enrolment), page routing, the
// study list and the viewer. Plain JavaScript, no framework; every request
// goes to the authenticated API or DICOMweb with the session cookie, and
// every state-changing one carries X-CSRF-Token. The administration pages
// (devices, users, alerts, audit, posture) are in admin.js, which registers
// them through window.BastionUI.
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const PAGE = 25;
  const TAG = {
    patientName: '00100010', patientId: '00100020', birthDate: '00100030',
    studyDate: '00080020', studyTime: '00080030', accession: '00080050',
    modalities: '00080061', studyDescription: '00081030', studyUid: '0020000D',
    nSeries: '00201206', nInstances: '00201208',
    seriesUid: '0020000E', modality: '00080060', seriesNumber: '00200011',
    seriesDescription: '0008103E', nSeriesInstances: '00201209',
    sopUid: '00080018', instanceNumber: '00200013', frames: '00280008',
    rows: '00280010', columns: '00280011', bitsStored: '00280101',
    windowCenter: '00281050', windowWidth: '00281051',
    rescaleIntercept: '00281052', rescaleSlope: '00281053',
    smallestPixel: '00280106', largestPixel: '00280107',
  };
  const STUDY_FIELDS = [TAG.patientName, TAG.patientId, TAG.birthDate, TAG.studyDate,
    TAG.studyTime, TAG.accession, TAG.modalities, TAG.studyDescription, TAG.nSeries,
    TAG.nInstances];
  const VIEWS = ['login-view', 'totp-view', 'password-view', 'list-view', 'viewer-view'];

  const state = {
    csrf: sessionStorage.getItem('bastion.csrf') || '',
    user: sessionStorage.getItem('bastion.user') || '',
    permissions: [],
    offset: 0,
    query: null,
    rows: [], // the study list page's QIDO rows
    sort: { key: 'date', dir: -1 }, // the list's order: newest first
    study: null, // the study's QIDO row
    series: [], // [{uid, modality, number, description, images}]
    seriesIndex: 0,
    images: [], // [{sop, frame}] of the current series
    imageIndex: 0,
    window: '', // "center,width" or '' (the image's own)
    renderSeq: 0,
    rendering: false,
    renderAgain: false,
    imageUrl: null,
    tool: 'window',
    imageWindow: null, // [center, width] the server applied to the shown image
    idleSecs: 0,
    lastActivity: Date.now(),
    zoom: 1,
    panX: 0,
    panY: 0,
  };

  // ---- helpers ---------------------------------------------------------
  const pages = {}; // name -> {view, needs, enter}

  function show(view) {
    const all = VIEWS.concat(Object.values(pages).map((p) => p.view));
    for (const v of new Set(all)) $(v).hidden = v !== view;
    const inside = !['login-view', 'totp-view', 'password-view'].includes(view);
    $('logout').hidden = !inside;
    $('change-password').hidden = !inside;
    $('who').hidden = !inside;
    $('nav').hidden = !inside;
    $('who').textContent = state.user;
  }
  function message(el, text) {
    el.textContent = text || '';
    el.hidden = !text;
  }
  function value(ds, tag) {
    const e = ds && ds[tag];
    if (!e || !e.Value || !e.Value.length) return '';
    const v = e.Value[0];
    if (v && typeof v === 'object') return v.Alphabetic || v.Ideographic || '';
    return String(v);
  }
  function values(ds, tag) {
    const e = ds && ds[tag];
    return e && e.Value ? e.Value.map(String) : [];
  }
  function personName(pn) {
    return pn.replace(/\^+$/, '').split('^').filter(Boolean).join(', ');
  }
  function dicomDate(d) {
    return /^\d{8}$/.test(d) ? `${d.slice(0, 4)}-${d.slice(4, 6)}-${d.slice(6, 8)}` : d;
  }
  function setCsrf(csrf, user) {
    state.csrf = csrf;
    state.user = user;
    if (csrf) {
      sessionStorage.setItem('bastion.csrf', csrf);
      sessionStorage.setItem('bastion.user', user);
    } else {
      sessionStorage.removeItem('bastion.csrf');
      sessionStorage.removeItem('bastion.user');
      state.permissions = [];
    }
  }
  const may = (p) => state.permissions.includes(p);

  class SessionExpired extends Error {}
  class ApiFailure extends Error {
    constructor(status, text, retryAfter, reason) {
      super(text);
      this.status = status;
      this.retryAfter = retryAfter;
      // why an image cannot be shown, in words for a clinician (rendering)
      this.reason = reason || null;
    }
  }

  async function errorText(r) {
    try {
      const body = await r.json();
      if (body && body.error) return body.error;
    } catch (_) { /* not JSON */ }
    return `${r.status} ${r.statusText}`;
  }

  // An authenticated request: a 401 means the session is gone.
  async function api(path, options) {
    const opts = Object.assign({ credentials: 'same-origin', headers: {} }, options || {});
    if (opts.method && opts.method !== 'GET') opts.headers['X-CSRF-Token'] = state.csrf;
    if (opts.json !== undefined) {
      opts.headers['Content-Type'] = 'application/json';
      opts.body = JSON.stringify(opts.json);
      delete opts.json;
    }
    const r = await fetch(path, opts);
    if (r.status === 401) {
      expire();
      throw new SessionExpired('session expired');
    }
    if (!r.ok) {
      const body = await r.text();
      let parsed = null;
      try { parsed = JSON.parse(body); } catch (_) { /* not JSON */ }
      const text = parsed && parsed.error ? parsed.error : `${r.status} ${r.statusText}`;
      throw new ApiFailure(r.status, text, r.headers.get('Retry-After'),
        parsed && typeof parsed.reason === 'string' ? parsed.reason : null);
    }
    return r;
  }
  async function apiJson(path, options) {
    const r = await api(path, options);
    const text = await r.text();
    return text ? JSON.parse(text) : null;
  }
  async function dicomJson(path) {
    const r = await api(path, { headers: { Accept: 'application/dicom+json' } });
    const text = await r.text();
    return text ? JSON.parse(text) : [];
  }
  function expire() {
    setCsrf('', '');
    leaveViewer();
    showLogin('Your session has expired. Please log in again.');
  }
  // The text to show for a failed request (null: the session expired and
  // the login page is already shown).
  function failure(e) {
    if (e instanceof SessionExpired) return null;
    if (e instanceof ApiFailure) return e.message;
    return 'The server could not be reached.';
  }

  // ---- login, TOTP enrolment, password change, logout -----------------
  function showLogin(notice) {
    message($('login-notice'), notice);
    message($('login-error'), '');
    $('login-password').value = '';
    $('login-totp').value = '';
    show('login-view');
    ($('login-username').value ? $('login-password') : $('login-username')).focus();
  }

  async function anonymousPost(path, body) {
    return fetch(path, {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body),
    });
  }
  function refusal(r, fallback) {
    if (r.status === 429) {
      const after = r.headers.get('Retry-After');
      const text = `Too many attempts. Try again in ${after || 'a few'} second${after === '1' ? '' : 's'}.`;
      // A long wait is the account's back-off or lock: only an
      // administrator can lift a lock sooner.
      return Number(after) >= 60
        ? `${text} If this keeps happening, the account may be locked: ask an administrator to unlock it (Users page).`
        : text;
    }
    return fallback;
  }

  let pendingLogin = null; // {username, totp} while a password change is asked
  let enrolment = null; // {username, password, secret} during TOTP enrolment

  // After a successful login or enrolment: the password change if asked,
  // else the first page the account may see.
  async function loggedIn(me, username, totp) {
    setCsrf(me.csrf, me.username);
    if (me.must_change_password) {
      pendingLogin = { username, totp };
      showPasswordChange(true);
      return;
    }
    await loadMe();
    route();
  }

  async function login(username, password, totp) {
    const body = { username, password };
    if (totp) body.totp = totp;
    let r;
    try {
      r = await anonymousPost('/api/login', body);
    } catch (_) {
      message($('login-error'), 'The server could not be reached.');
      return;
    }
    if (r.status === 403) {
      const text = await errorText(r);
      if (/two-factor/.test(text)) {
        await beginEnrolment(username, password);
        return;
      }
      message($('login-error'), text);
      return;
    }
    if (!r.ok) {
      message($('login-error'), refusal(r, r.status === 401
        ? 'Log-in failed: check the user name, the password and, if you use one, the one-time code.'
        : await errorText(r)));
      return;
    }
    await loggedIn(await r.json(), username, totp);
  }

  async function beginEnrolment(username, password) {
    let r;
    try {
      r = await anonymousPost('/api/totp/enrol', { username, password });
    } catch (_) {
      message($('login-error'), 'The server could not be reached.');
      return;
    }
    if (!r.ok) {
      message($('login-error'), refusal(r, await errorText(r)));
      return;
    }
    const e = await r.json();
    enrolment = { username, password, secret: e.secret };
    const qr = URL.createObjectURL(new Blob([e.qr_svg], { type: 'image/svg+xml' }));
    const img = $('totp-qr');
    img.onload = () => URL.revokeObjectURL(qr);
    img.src = qr;
    // Groups of four that never break inside (easier to type by hand).
    $('totp-secret').replaceChildren(...e.secret.match(/.{1,4}/g).map((g) => {
      const span = document.createElement('span');
      span.textContent = g;
      return span;
    }));
    $('totp-secret').dataset.secret = e.secret;
    message($('totp-error'), '');
    $('totp-form').reset();
    show('totp-view');
    $('totp-code').focus();
  }

  $('totp-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (!enrolment) return;
    const code = $('totp-code').value.trim();
    let r;
    try {
      r = await anonymousPost('/api/totp/enrol', {
        username: enrolment.username, password: enrolment.password,
        secret: enrolment.secret, totp: code,
      });
    } catch (_) {
      message($('totp-error'), 'The server could not be reached.');
      return;
    }
    if (!r.ok) {
      message($('totp-error'), refusal(r, r.status === 401
        ? 'That code was not accepted: check the app and the device clock, and enter the current code.'
        : await errorText(r)));
      return;
    }
    const username = enrolment.username;
    enrolment = null;
    await loggedIn(await r.json(), username, code);
  });
  $('totp-cancel').addEventListener('click', () => {
    enrolment = null;
    showLogin('');
  });

  $('login-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    message($('login-notice'), '');
    message($('login-error'), '');
    login($('login-username').value.trim(), $('login-password').value, $('login-totp').value.trim());
  });

  $('password-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const old = $('password-old').value;
    const fresh = $('password-new').value;
    if (fresh !== $('password-again').value) {
      message($('password-error'), 'The two new passwords differ.');
      return;
    }
    const p = pendingLogin || { username: state.user, voluntary: true };
    let r;
    try {
      r = await anonymousPost('/api/password', { username: p.username, old_password: old, new_password: fresh });
    } catch (_) {
      message($('password-error'), 'The server could not be reached.');
      return;
    }
    if (!r.ok) {
      message($('password-error'), refusal(r, r.status === 401 ? 'The current password is wrong.' : await errorText(r)));
      return;
    }
    // An account with a second factor stays logged in: the answer is a new
    // session (every other one ended), so no second one-time code is
    // needed (a code is never accepted twice).
    pendingLogin = null;
    if (r.status === 200) {
      const me = await r.json();
      setCsrf(me.csrf, me.username);
      await loadMe();
      route();
      return;
    }
    // Otherwise the change ended the session: log in again with the new
    // password (at the list).
    setCsrf('', '');
    forgetStudyUrl();
    $('login-username').value = p.username;
    if (p.totp || p.voluntary) {
      showLogin(p.totp
        ? 'Password changed. Log in with the new password and the next one-time code.'
        : 'Password changed. Log in with the new password.');
      return;
    }
    await login(p.username, fresh, '');
  });

  function showPasswordChange(forced) {
    message($('password-error'), '');
    $('password-form').reset();
    $('password-forced').hidden = !forced;
    $('password-cancel').textContent = forced ? 'Log out' : 'Cancel';
    show('password-view');
    $('password-old').focus();
  }
  $('change-password').addEventListener('click', () => {
    pendingLogin = null;
    showPasswordChange(false);
  });
  $('password-cancel').addEventListener('click', async () => {
    if (pendingLogin || !state.csrf) {
      // The forced change: leaving it means logging out.
      pendingLogin = null;
      try {
        await api('/api/logout', { method: 'POST' });
      } catch (_) { /* gone already */ }
      setCsrf('', '');
      showLogin('You are logged out.');
      return;
    }
    route();
  });

  $('logout').addEventListener('click', async () => {
    try {
      await api('/api/logout', { method: 'POST' });
    } catch (_) { /* gone already */ }
    setCsrf('', '');
    leaveViewer();
    forgetStudyUrl();
    showLogin('You are logged out.');
  });

  // ---- pages ----------------------------------------------------------------
  function register(name, page) {
    pages[name] = page;
  }
  async function loadMe() {
    const r = await fetch('/api/me', { credentials: 'same-origin' });
    if (!r.ok) throw new ApiFailure(r.status, await errorText(r));
    const me = await r.json();
    state.user = me.username;
    state.permissions = me.permissions || [];
    state.idleSecs = Number(me.session_idle_secs) || 30 * 60;
    // Where Bastion serves the OHIF Viewer ([http] ohif_dir), or null.
    state.viewer = typeof me.viewer === 'string' && me.viewer.startsWith('/') ? me.viewer : null;
    $('ohif-col').hidden = !state.viewer;
    state.lastActivity = Date.now();
    for (const a of $('nav').querySelectorAll('a')) a.hidden = !may(a.dataset.needs);
    $('download').hidden = !may('export');
    return me;
  }
  function firstPage() {
    return Object.keys(pages).find((n) => may(pages[n].needs)) || null;
  }
  // Shows the page named in the URL's hash (#/name), or the first one the
  // account may see.
  function route() {
    if (!state.csrf) return;
    // #/study/<StudyInstanceUID>: the viewer on that study (a link, a reload).
    const study = location.hash.match(/^#\/study\/([0-9.]{1,64})$/);
    if (study && pages.studies) {
      for (const a of $('nav').querySelectorAll('a')) {
        a.classList.toggle('current', a.dataset.page === 'studies');
      }
      if (state.study && value(state.study, TAG.studyUid) === study[1]) return;
      leaveViewer();
      if (!may(pages.studies.needs)) {
        show('list-view');
        $('list-view').classList.add('refused');
        pages.studies.refused();
        return;
      }
      openStudyByUid(study[1]);
      return;
    }
    let name = (location.hash.match(/^#\/([a-z]+)/) || [])[1];
    if (!name || !pages[name]) {
      name = firstPage();
      if (!name) {
        show('list-view');
        $('list-view').classList.add('refused');
        message($('list-error'), 'This account has no access to any page of this application.');
        return;
      }
      if (location.hash !== `#/${name}`) {
        history.replaceState(null, '', `#/${name}`);
      }
    }
    for (const a of $('nav').querySelectorAll('a')) {
      a.classList.toggle('current', a.dataset.page === name);
    }
    const page = pages[name];
    leaveViewer();
    show(page.view);
    const view = $(page.view);
    view.classList.toggle('refused', !may(page.needs));
    if (!may(page.needs)) {
      page.refused();
      return;
    }
    page.enter();
  }
  window.addEventListener('hashchange', route);

  // A modal confirmation (no window.confirm: calmer, and testable).
  function confirmAction(text) {
    const d = $('confirm');
    $('confirm-text').textContent = text;
    d.returnValue = '';
    d.dataset.shown = String((Number(d.dataset.shown) || 0) + 1); // tests wait on it
    d.showModal();
    return new Promise((resolve) => {
      d.addEventListener('close', () => resolve(d.returnValue === 'yes'), { once: true });
    });
  }
  function cell(tr, text, cls) {
    const td = document.createElement('td');
    td.textContent = text === undefined || text === null ? '' : String(text);
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }
  function when(ts) {
    if (!ts) return '';
    const d = new Date(ts);
    if (Number.isNaN(d.getTime())) return String(ts);
    const pad = (n) => String(n).padStart(2, '0');
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} `
      + `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  // ---- study list -------------------------------------------------------
  function dateParam(from, to) {
    const f = from.replaceAll('-', '');
    const t = to.replaceAll('-', '');
    if (!f && !t) return '';
    if (f === t) return f;
    return `${f}-${t}`;
  }
  function readQuery() {
    const q = new URLSearchParams();
    let name = $('q-name').value.trim();
    if (name) {
      if (!/[*?]/.test(name)) name += '*';
      q.set('PatientName', name);
    }
    const pid = $('q-pid').value.trim();
    if (pid) q.set('PatientID', pid);
    const date = dateParam($('q-from').value, $('q-to').value);
    if (date) q.set('StudyDate', date);
    const modality = $('q-modality').value;
    if (modality) q.set('ModalitiesInStudy', modality);
    const accession = $('q-accession').value.trim();
    if (accession) q.set('AccessionNumber', accession);
    return q;
  }

  async function search() {
    const q = new URLSearchParams(state.query);
    q.set('limit', String(PAGE));
    q.set('offset', String(state.offset));
    for (const f of STUDY_FIELDS) q.append('includefield', f);
    message($('list-error'), '');
    let rows;
    try {
      rows = await dicomJson(`/dicomweb/studies?${q}`);
    } catch (e) {
      const text = failure(e);
      if (text) message($('list-error'), text);
      return;
    }
    state.rows = rows;
    renderStudies();
    $('list-empty').hidden = rows.length > 0;
    $('prev').disabled = state.offset === 0;
    $('next').disabled = rows.length < PAGE;
    $('page-info').textContent = rows.length
      ? `Studies ${state.offset + 1}–${state.offset + rows.length}` : '';
  }

  // The sort key of a study row for each sortable column.
  const SORT_KEYS = {
    patient: (ds) => personName(value(ds, TAG.patientName)).toLowerCase(),
    pid: (ds) => value(ds, TAG.patientId),
    birth: (ds) => value(ds, TAG.birthDate),
    date: (ds) => `${value(ds, TAG.studyDate)} ${value(ds, TAG.studyTime)}`,
    accession: (ds) => value(ds, TAG.accession),
    modality: (ds) => values(ds, TAG.modalities).join(','),
    description: (ds) => value(ds, TAG.studyDescription).toLowerCase(),
    series: (ds) => Number(value(ds, TAG.nSeries)) || 0,
    images: (ds) => Number(value(ds, TAG.nInstances)) || 0,
  };
  // The rows of the page in the chosen order (the server sends the newest
  // studies first; a header click orders the page by that column, a
  // second click reverses it). Empty values go last either way.
  function renderStudies() {
    const { key, dir } = state.sort;
    const get = SORT_KEYS[key] || SORT_KEYS.date;
    const rows = state.rows.map((ds, i) => ({ ds, i, k: get(ds) }));
    rows.sort((a, b) => {
      const ea = a.k === '' || a.k === ' ';
      const eb = b.k === '' || b.k === ' ';
      if (ea !== eb) return ea ? 1 : -1;
      if (a.k < b.k) return -dir;
      if (a.k > b.k) return dir;
      return a.i - b.i;
    });
    for (const th of $('studies').tHead.rows[0].cells) {
      if (th.dataset.sort === key) {
        th.setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
      } else {
        th.removeAttribute('aria-sort');
      }
    }
    const body = $('studies').tBodies[0];
    body.replaceChildren();
    for (const { ds } of rows) {
      const tr = document.createElement('tr');
      tr.tabIndex = 0;
      tr.dataset.study = value(ds, TAG.studyUid);
      const cells = [
        personName(value(ds, TAG.patientName)),
        value(ds, TAG.patientId),
        dicomDate(value(ds, TAG.birthDate)),
        dicomDate(value(ds, TAG.studyDate)),
        value(ds, TAG.accession),
        values(ds, TAG.modalities).join(', '),
        value(ds, TAG.studyDescription),
        value(ds, TAG.nSeries),
        value(ds, TAG.nInstances),
      ];
      cells.forEach((text, i) => cell(tr, text, i >= 7 ? 'num' : ''));
      if (state.viewer) {
        // "Open in OHIF": the same study in the OHIF Viewer Bastion serves,
        // with the same session (a link: it can be opened in a new tab).
        const td = cell(tr, '', 'ohif');
        const a = document.createElement('a');
        a.className = 'ohif-link';
        a.textContent = 'Open in OHIF';
        a.href = `${state.viewer}viewer?StudyInstanceUIDs=${encodeURIComponent(value(ds, TAG.studyUid))}`;
        a.addEventListener('click', (ev) => ev.stopPropagation());
        a.addEventListener('keydown', (ev) => ev.stopPropagation());
        td.appendChild(a);
      }
      tr.addEventListener('click', () => openStudy(ds));
      tr.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') openStudy(ds); });
      body.appendChild(tr);
    }
  }
  for (const th of $('studies').tHead.rows[0].cells) {
    const button = th.querySelector('button.sort');
    if (!button) continue;
    button.addEventListener('click', () => {
      const key = th.dataset.sort;
      if (state.sort.key === key) {
        state.sort = { key, dir: -state.sort.dir };
      } else {
        // Text A to Z; dates and counts largest (newest) first.
        const down = ['date', 'birth', 'series', 'images'].includes(key);
        state.sort = { key, dir: down ? -1 : 1 };
      }
      renderStudies();
    });
  }

  function enterList() {
    if (state.query === null) {
      state.query = readQuery().toString();
      state.offset = 0;
    }
    search();
  }
  register('studies', {
    view: 'list-view',
    needs: 'query',
    enter: enterList,
    refused() {
      $('studies').tBodies[0].replaceChildren();
      $('list-empty').hidden = true;
      message($('list-error'), 'Your role does not give access to images.');
    },
  });

  $('search-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    state.query = readQuery().toString();
    state.offset = 0;
    search();
  });
  $('prev').addEventListener('click', () => {
    state.offset = Math.max(0, state.offset - PAGE);
    search();
  });
  $('next').addEventListener('click', () => {
    state.offset += PAGE;
    search();
  });

  // ---- viewer -------------------------------------------------------------
  const base = () => `/dicomweb/studies/${encodeURIComponent(value(state.study, TAG.studyUid))}`;
  const seriesBase = (s) => `${base()}/series/${encodeURIComponent(s.uid)}`;

  // Opens the study a #/study/<uid> URL names (a link or a reload).
  async function openStudyByUid(uid) {
    const q = new URLSearchParams();
    q.set('StudyInstanceUID', uid);
    for (const f of STUDY_FIELDS) q.append('includefield', f);
    let rows;
    try {
      rows = await dicomJson(`/dicomweb/studies?${q}`);
    } catch (e) {
      const text = failure(e);
      if (text !== null) {
        show('list-view');
        message($('list-error'), text);
      }
      return;
    }
    if (!rows.length) {
      show('list-view');
      message($('list-error'), 'No study with this Study Instance UID is stored (or it is not yours to see).');
      return;
    }
    openStudy(rows[0]);
  }

  async function openStudy(ds) {
    // The URL names the study, so it can be linked and reloaded.
    const here = `#/study/${value(ds, TAG.studyUid)}`;
    if (location.hash !== here) history.pushState(null, '', here);
    state.study = ds;
    state.series = [];
    state.window = '';
    state.imageWindow = null;
    setTool('window');
    resetView();
    show('viewer-view');
    message($('viewer-error'), '');
    $('series').replaceChildren();
    $('ov-patient').textContent = [
      personName(value(ds, TAG.patientName)),
      value(ds, TAG.patientId),
      value(ds, TAG.birthDate) ? `born ${dicomDate(value(ds, TAG.birthDate))}` : '',
    ].filter(Boolean).join('\n');
    $('ov-study').textContent = [
      value(ds, TAG.studyDescription), dicomDate(value(ds, TAG.studyDate)),
      value(ds, TAG.accession) ? `Acc. ${value(ds, TAG.accession)}` : '',
    ].filter(Boolean).join('\n');
    showImageState('loading');
    let rows;
    try {
      rows = await dicomJson(`${base()}/series?includefield=${TAG.seriesDescription}`
        + `&includefield=${TAG.nSeriesInstances}`);
    } catch (e) {
      if (failure(e)) showImageState('cannot');
      return;
    }
    state.series = rows.map((r) => ({
      uid: value(r, TAG.seriesUid),
      modality: value(r, TAG.modality),
      number: Number(value(r, TAG.seriesNumber)) || 0,
      description: value(r, TAG.seriesDescription),
      count: value(r, TAG.nSeriesInstances),
    })).sort((a, b) => a.number - b.number);
    if (!state.series.length) {
      showImageState('cannot');
      return;
    }
    await Promise.all(state.series.map(loadInstances));
    renderThumbs();
    selectSeries(0);
  }

  async function loadInstances(s) {
    try {
      const rows = await dicomJson(`${seriesBase(s)}/instances?includefield=${TAG.frames}`);
      rows.sort((a, b) => (Number(value(a, TAG.instanceNumber)) || 0) - (Number(value(b, TAG.instanceNumber)) || 0));
      s.images = [];
      for (const r of rows) {
        const frames = Math.max(1, Number(value(r, TAG.frames)) || 1);
        const sop = value(r, TAG.sopUid);
        for (let f = 1; f <= frames; f++) s.images.push({ sop, frame: frames > 1 ? f : 0 });
      }
    } catch (e) {
      s.images = [];
      failure(e);
    }
  }

  function renderThumbs() {
    const aside = $('series');
    aside.replaceChildren();
    state.series.forEach((s, i) => {
      const b = document.createElement('button');
      b.type = 'button';
      b.className = 'thumb';
      b.dataset.index = String(i);
      if (s.images && s.images.length) {
        const img = document.createElement('img');
        img.alt = `series ${s.number}`;
        img.src = `${seriesBase(s)}/instances/${encodeURIComponent(s.images[0].sop)}/thumbnail`;
        img.addEventListener('error', () => {
          const none = document.createElement('span');
          none.className = 'thumb-none';
          none.textContent = 'no preview';
          img.replaceWith(none);
        });
        b.appendChild(img);
      } else {
        const none = document.createElement('span');
        none.className = 'thumb-none';
        none.textContent = 'no images';
        b.appendChild(none);
      }
      const label = document.createElement('span');
      label.textContent = `${s.modality} ${s.number || ''} ${s.description}`.trim()
        + (s.images ? ` · ${s.images.length}` : '');
      b.appendChild(label);
      b.addEventListener('click', () => selectSeries(i));
      aside.appendChild(b);
    });
  }

  function selectSeries(i) {
    state.seriesIndex = i;
    const s = state.series[i];
    state.images = s.images || [];
    state.imageIndex = 0;
    for (const t of $('series').children) t.classList.toggle('active', t.dataset.index === String(i));
    const ct = s.modality === 'CT';
    for (const b of $('presets').querySelectorAll('[data-ct]')) b.hidden = !ct;
    if (!ct) state.window = '';
    markPreset();
    $('stage').focus();
    renderImage();
  }

  function markPreset() {
    for (const b of $('presets').querySelectorAll('button')) {
      b.classList.toggle('active', b.dataset.window === state.window);
    }
    const [c, w] = state.window ? state.window.split(',') : [];
    $('ov-window').textContent = [
      state.window ? `W ${w} / L ${c}` : '',
      state.zoom !== 1 ? `zoom ${Math.round(state.zoom * 100)} %` : '',
    ].filter(Boolean).join('\n');
  }

  function showImageState(which) {
    $('image').hidden = which !== 'image';
    $('cannot').hidden = which !== 'cannot';
    $('loading').hidden = which !== 'loading';
  }

  // Renders the current image; while one render is on its way, later
  // requests (a window drag) are folded into one more render.
  async function renderImage() {
    if (state.rendering) {
      state.renderAgain = true;
      return;
    }
    state.rendering = true;
    try {
      do {
        state.renderAgain = false;
        await renderOnce();
      } while (state.renderAgain);
    } finally {
      state.rendering = false;
    }
  }

  async function renderOnce() {
    const n = state.images.length;
    const seq = ++state.renderSeq;
    if (!n) {
      $('ov-position').textContent = '';
      $('cannot').textContent = 'Cannot display this image.';
      showImageState('cannot');
      return;
    }
    const s = state.series[state.seriesIndex];
    const im = state.images[state.imageIndex];
    $('ov-position').textContent = [
      `${s.modality} series ${s.number || ''}`.trim(),
      `image ${state.imageIndex + 1} of ${n}`,
    ].join('\n');
    let url = `${seriesBase(s)}/instances/${encodeURIComponent(im.sop)}`
      + (im.frame ? `/frames/${im.frame}` : '') + '/rendered';
    if (state.window) url += `?window=${encodeURIComponent(state.window)}`;
    let blob;
    let used = null;
    try {
      const r = await api(url, { headers: { Accept: 'image/png' } });
      used = r.headers.get('X-Bastion-Window');
      blob = await r.blob();
    } catch (e) {
      if (seq === state.renderSeq && failure(e)) {
        $('image').removeAttribute('data-src');
        // The server's reason when the image itself cannot be shown.
        $('cannot').textContent = (e instanceof ApiFailure && e.reason) || 'Cannot display this image.';
        showImageState('cannot');
      }
      return;
    }
    if (seq !== state.renderSeq) return;
    const w = used ? used.split(',').map(Number) : null;
    state.imageWindow = w && w.length === 2 && w.every(Number.isFinite) ? w : null;
    const img = $('image');
    const old = state.imageUrl;
    state.imageUrl = URL.createObjectURL(blob);
    await new Promise((resolve) => {
      img.onload = () => { if (old) URL.revokeObjectURL(old); resolve(); };
      img.onerror = () => {
        if (seq === state.renderSeq) {
          $('cannot').textContent = 'Cannot display this image.';
          showImageState('cannot');
        }
        resolve();
      };
      img.dataset.src = url;
      img.alt = `image ${state.imageIndex + 1} of ${n}`;
      img.src = state.imageUrl;
      showImageState('image');
    });
  }

  function step(delta) {
    const n = state.images.length;
    if (!n) return;
    const next = Math.min(n - 1, Math.max(0, state.imageIndex + delta));
    if (next !== state.imageIndex) {
      state.imageIndex = next;
      renderImage();
    }
  }

  // On logout (own or idle) the URL stops naming a study: the next person
  // at this browser starts at the list. An expired session keeps it, so
  // logging in again (or following a link) reopens the study.
  function forgetStudyUrl() {
    if (location.hash.startsWith('#/study/')) history.replaceState(null, '', '#/studies');
  }
  function leaveViewer() {
    state.renderSeq++;
    state.study = null;
    if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
    state.imageUrl = null;
    $('image').removeAttribute('src');
  }

  // -- window/level by dragging, zoom and pan
  function applyTransform() {
    $('image').style.transform = `translate(${state.panX}px, ${state.panY}px) scale(${state.zoom})`;
    markPreset();
  }
  function resetView() {
    state.zoom = 1;
    state.panX = 0;
    state.panY = 0;
    applyTransform();
  }
  function zoomBy(f) {
    state.zoom = Math.min(16, Math.max(0.25, state.zoom * f));
    applyTransform();
  }
  function setTool(tool) {
    state.tool = tool;
    for (const [id, t] of [['tool-window', 'window'], ['tool-pan', 'pan']]) {
      $(id).classList.toggle('active', t === tool);
      $(id).setAttribute('aria-pressed', String(t === tool));
    }
  }
  $('tool-window').addEventListener('click', () => setTool('window'));
  $('tool-pan').addEventListener('click', () => setTool('pan'));
  $('zoom-in').addEventListener('click', () => zoomBy(1.25));
  $('zoom-out').addEventListener('click', () => zoomBy(0.8));
  $('zoom-fit').addEventListener('click', resetView);

  // The window the drag starts from: the current one, else the one the
  // server applied to the shown image (X-Bastion-Window), else the image's
  // header (Window Center/Width, Smallest/Largest pixel), else its bit depth.
  async function startingWindow() {
    if (state.window) return state.window.split(',').map(Number);
    if (state.imageWindow) return state.imageWindow.map(Math.round);
    const s = state.series[state.seriesIndex];
    const im = state.images[state.imageIndex];
    try {
      const [m] = await dicomJson(`${seriesBase(s)}/instances/${encodeURIComponent(im.sop)}/metadata`);
      const c = Number(value(m, TAG.windowCenter));
      const w = Number(value(m, TAG.windowWidth));
      if (value(m, TAG.windowWidth) && w > 0) return [c, w];
      const slope = Number(value(m, TAG.rescaleSlope)) || 1;
      const icpt = Number(value(m, TAG.rescaleIntercept)) || 0;
      const lo = value(m, TAG.smallestPixel);
      const hi = value(m, TAG.largestPixel);
      if (lo && hi && Number(hi) > Number(lo)) {
        const a = Number(lo) * slope + icpt;
        const b = Number(hi) * slope + icpt;
        return [Math.round((a + b) / 2), Math.round(b - a)];
      }
      // No window in the header: soft tissue for CT (Hounsfield units),
      // else the stored bit depth's range.
      if (s.modality === 'CT') return [40, 400];
      const bits = Math.min(16, Number(value(m, TAG.bitsStored)) || 8);
      return [2 ** (bits - 1) * slope + icpt, 2 ** bits * slope];
    } catch (_) {
      return [128, 256];
    }
  }

  let drag = null;
  $('stage').addEventListener('pointerdown', async (ev) => {
    if (ev.button !== 0 || $('image').hidden) return;
    ev.preventDefault();
    $('stage').setPointerCapture(ev.pointerId);
    const d = { x: ev.clientX, y: ev.clientY, tool: state.tool, panX: state.panX, panY: state.panY, win: null };
    drag = d;
    if (d.tool === 'window') d.win = await startingWindow();
  });
  $('stage').addEventListener('pointermove', (ev) => {
    if (!drag) return;
    const dx = ev.clientX - drag.x;
    const dy = ev.clientY - drag.y;
    if (drag.tool === 'pan') {
      state.panX = drag.panX + dx;
      state.panY = drag.panY + dy;
      applyTransform();
      return;
    }
    if (!drag.win) return;
    // Left-right: width; up-down: level. One screen pixel moves by a
    // 256th of the starting width, at least one unit.
    const [c0, w0] = drag.win;
    const unit = Math.max(1, w0 / 256);
    const w = Math.max(1, Math.round(w0 + dx * unit));
    const c = Math.round(c0 + dy * unit);
    const next = `${c},${w}`;
    if (next !== state.window) {
      state.window = next;
      markPreset();
      renderImage();
    }
  });
  const endDrag = () => { drag = null; };
  $('stage').addEventListener('pointerup', endDrag);
  $('stage').addEventListener('pointercancel', endDrag);

  $('presets').addEventListener('click', (ev) => {
    const b = ev.target.closest('button');
    if (!b) return;
    state.window = b.dataset.window;
    markPreset();
    renderImage();
  });
  $('stage').addEventListener('wheel', (ev) => {
    ev.preventDefault();
    if (ev.ctrlKey) {
      zoomBy(ev.deltaY < 0 ? 1.1 : 1 / 1.1);
      return;
    }
    step(ev.deltaY > 0 ? 1 : -1);
  }, { passive: false });
  document.addEventListener('keydown', (ev) => {
    if ($('viewer-view').hidden || ev.target.closest('input, select, textarea, dialog')) return;
    const moves = { ArrowDown: 1, ArrowRight: 1, PageDown: 10, ArrowUp: -1, ArrowLeft: -1, PageUp: -10 };
    if (ev.key in moves) {
      ev.preventDefault();
      step(moves[ev.key]);
    } else if (ev.key === 'Home') {
      step(-state.images.length);
    } else if (ev.key === 'End') {
      step(state.images.length);
    } else if (ev.key === '+' || ev.key === '=') {
      zoomBy(1.25);
    } else if (ev.key === '-') {
      zoomBy(0.8);
    } else if (ev.key === '0') {
      resetView();
    } else if (ev.key === 'Escape') {
      back();
    }
  });
  function back() {
    leaveViewer();
    if (location.hash.startsWith('#/study/')) history.pushState(null, '', '#/studies');
    show('list-view');
    if (state.query === null) {
      enterList();
    } else {
      search();
    }
  }
  $('back').addEventListener('click', back);

  // -- study download (zip of Part 10 files; export permission)
  $('download').addEventListener('click', async () => {
    if (!state.study) return;
    const uid = value(state.study, TAG.studyUid);
    const b = $('download');
    b.disabled = true;
    message($('viewer-error'), '');
    const old = b.textContent;
    b.textContent = 'Preparing download…';
    try {
      const r = await api(`/api/studies/${encodeURIComponent(uid)}/export`);
      const blob = await r.blob();
      const a = document.createElement('a');
      a.href = URL.createObjectURL(blob);
      a.download = `study-${uid}.zip`;
      document.body.appendChild(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(a.href), 60000);
    } catch (e) {
      const text = failure(e);
      if (text) message($('viewer-error'), `Download refused: ${text}`);
    } finally {
      b.disabled = false;
      b.textContent = old;
    }
  });

  // ---- idle logout ----------------------------------------------------------
  // The server ends a session after session_idle_secs without requests; the
  // page must not keep a patient's images on screen meanwhile: after the same
  // time without keyboard or mouse activity it logs out and clears them.
  for (const type of ['pointerdown', 'pointermove', 'keydown', 'wheel', 'touchstart']) {
    document.addEventListener(type, () => { state.lastActivity = Date.now(); }, { passive: true });
  }
  setInterval(async () => {
    if (!state.csrf || !state.idleSecs) return;
    if (Date.now() - state.lastActivity < state.idleSecs * 1000) return;
    try {
      await fetch('/api/logout', {
        method: 'POST', credentials: 'same-origin', headers: { 'X-CSRF-Token': state.csrf },
      });
    } catch (_) { /* the server ends it anyway */ }
    setCsrf('', '');
    pendingLogin = null;
    leaveViewer();
    forgetStudyUrl();
    showLogin(`You were logged out after ${Math.round(state.idleSecs / 60)} minutes without activity.`);
  }, 5000);

  // ---- start --------------------------------------------------------------
  window.BastionUI = {
    $, api, apiJson, message, failure, register, show, cell, when, confirmAction, may,
    ApiFailure, currentUser: () => state.user,
  };

  async function start() {
    if (!state.csrf) {
      showLogin('');
      return;
    }
    try {
      const me = await loadMe().catch((e) => {
        if (e instanceof ApiFailure && e.status === 401) return null;
        throw e;
      });
      if (!me) {
        setCsrf('', '');
        showLogin('Your session has expired. Please log in again.');
        return;
      }
      if (me.must_change_password) {
        pendingLogin = { username: me.username };
        showPasswordChange(true);
        return;
      }
      route();
    } catch (_) {
      showLogin('The server could not be reached.');
    }
  }
  // admin.js registers its pages before this runs (deferred scripts run in
  // order, before DOMContentLoaded).
  document.addEventListener('DOMContentLoaded', start);
}());
