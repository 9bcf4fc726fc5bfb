// Bastion web UI: login, study list, viewer. Plain JavaScript, no
// framework; every request goes to the authenticated API or DICOMweb with
// the session cookie, and every state-changing one carries X-CSRF-Token.
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
    rows: '00280010', columns: '00280011',
  };
  const STUDY_FIELDS = [TAG.patientName, TAG.patientId, TAG.birthDate, TAG.studyDate,
    TAG.accession, TAG.modalities, TAG.studyDescription, TAG.nSeries, TAG.nInstances];

  const state = {
    csrf: sessionStorage.getItem('bastion.csrf') || '',
    user: sessionStorage.getItem('bastion.user') || '',
    offset: 0,
    query: null,
    study: null, // the study's QIDO row
    series: [], // [{uid, modality, number, description}]
    seriesIndex: 0,
    images: [], // [{sop, frame}] of the current series
    imageIndex: 0,
    window: '',
    renderSeq: 0,
    imageUrl: null,
  };

  // ---- helpers ---------------------------------------------------------
  function show(view) {
    for (const v of ['login-view', 'password-view', 'list-view', 'viewer-view']) {
      $(v).hidden = v !== view;
    }
    const inside = view === 'list-view' || view === 'viewer-view';
    $('logout').hidden = !inside;
    $('who').hidden = !inside;
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
    }
  }

  class SessionExpired extends Error {}
  class ApiFailure extends Error {
    constructor(status, text, retryAfter) {
      super(text);
      this.status = status;
      this.retryAfter = retryAfter;
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
    const r = await fetch(path, opts);
    if (r.status === 401) {
      expire();
      throw new SessionExpired('session expired');
    }
    if (!r.ok) throw new ApiFailure(r.status, await errorText(r), r.headers.get('Retry-After'));
    return r;
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
  function failure(e) {
    if (e instanceof SessionExpired) return null;
    if (e instanceof ApiFailure) return e.message;
    return 'The server could not be reached.';
  }

  // ---- login, password change, logout ---------------------------------
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
      return `Too many attempts. Try again in ${after || 'a few'} second${after === '1' ? '' : 's'}.`;
    }
    return fallback;
  }

  let pendingLogin = null; // {username, password, totp} while a change is asked
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
    if (!r.ok) {
      message($('login-error'), refusal(r, r.status === 401
        ? 'Log-in failed: check the user name, the password and, if you use one, the one-time code.'
        : await errorText(r)));
      return;
    }
    const me = await r.json();
    setCsrf(me.csrf, me.username);
    if (me.must_change_password) {
      pendingLogin = { username, totp };
      message($('password-error'), '');
      $('password-form').reset();
      show('password-view');
      $('password-old').focus();
      return;
    }
    enterList();
  }

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
    const p = pendingLogin || { username: state.user };
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
    // The change ends the session: log in again with the new password.
    setCsrf('', '');
    pendingLogin = null;
    $('login-username').value = p.username;
    await login(p.username, fresh, p.totp);
  });

  $('logout').addEventListener('click', async () => {
    try {
      await api('/api/logout', { method: 'POST' });
    } catch (_) { /* gone already */ }
    setCsrf('', '');
    leaveViewer();
    showLogin('You are logged out.');
  });

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
    const body = $('studies').tBodies[0];
    body.replaceChildren();
    for (const ds of rows) {
      const tr = document.createElement('tr');
      tr.tabIndex = 0;
      const cells = [
        personName(value(ds, TAG.patientName)),
        value(ds, TAG.patientId),
        dicomDate(value(ds, TAG.birthDate)),
        dicomDate(value(ds, TAG.studyDate)),
        values(ds, TAG.modalities).join(', '),
        value(ds, TAG.studyDescription),
        value(ds, TAG.nSeries),
        value(ds, TAG.nInstances),
      ];
      cells.forEach((text, i) => {
        const td = document.createElement('td');
        td.textContent = text;
        if (i >= 6) td.className = 'num';
        tr.appendChild(td);
      });
      tr.addEventListener('click', () => openStudy(ds));
      tr.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') openStudy(ds); });
      body.appendChild(tr);
    }
    $('list-empty').hidden = rows.length > 0;
    $('prev').disabled = state.offset === 0;
    $('next').disabled = rows.length < PAGE;
    $('page-info').textContent = rows.length
      ? `Studies ${state.offset + 1}–${state.offset + rows.length}` : '';
  }

  function enterList() {
    show('list-view');
    if (state.query === null) {
      state.query = readQuery().toString();
      state.offset = 0;
    }
    search();
  }

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

  async function openStudy(ds) {
    state.study = ds;
    state.series = [];
    state.window = '';
    show('viewer-view');
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
    $('ov-window').textContent = state.window
      ? `W ${state.window.split(',')[1]} / L ${state.window.split(',')[0]}` : '';
  }

  function showImageState(which) {
    $('image').hidden = which !== 'image';
    $('cannot').hidden = which !== 'cannot';
    $('loading').hidden = which !== 'loading';
  }

  async function renderImage() {
    const n = state.images.length;
    const seq = ++state.renderSeq;
    if (!n) {
      $('ov-position').textContent = '';
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
    try {
      const r = await api(url, { headers: { Accept: 'image/png' } });
      blob = await r.blob();
    } catch (e) {
      if (seq === state.renderSeq && failure(e)) {
        $('image').removeAttribute('data-src');
        showImageState('cannot');
      }
      return;
    }
    if (seq !== state.renderSeq) return;
    const img = $('image');
    const old = state.imageUrl;
    state.imageUrl = URL.createObjectURL(blob);
    img.onload = () => { if (old) URL.revokeObjectURL(old); };
    img.onerror = () => { if (seq === state.renderSeq) showImageState('cannot'); };
    img.dataset.src = url;
    img.alt = `image ${state.imageIndex + 1} of ${n}`;
    img.src = state.imageUrl;
    showImageState('image');
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

  function leaveViewer() {
    state.renderSeq++;
    state.study = null;
    if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
    state.imageUrl = null;
    $('image').removeAttribute('src');
  }

  $('presets').addEventListener('click', (ev) => {
    const b = ev.target.closest('button');
    if (!b) return;
    state.window = b.dataset.window;
    markPreset();
    renderImage();
  });
  $('stage').addEventListener('wheel', (ev) => {
    ev.preventDefault();
    step(ev.deltaY > 0 ? 1 : -1);
  }, { passive: false });
  document.addEventListener('keydown', (ev) => {
    if ($('viewer-view').hidden || ev.target.closest('input, select, textarea')) return;
    const moves = { ArrowDown: 1, ArrowRight: 1, PageDown: 10, ArrowUp: -1, ArrowLeft: -1, PageUp: -10 };
    if (ev.key in moves) {
      ev.preventDefault();
      step(moves[ev.key]);
    } else if (ev.key === 'Home') {
      step(-state.images.length);
    } else if (ev.key === 'End') {
      step(state.images.length);
    } else if (ev.key === 'Escape') {
      back();
    }
  });
  function back() {
    leaveViewer();
    show('list-view');
    search();
  }
  $('back').addEventListener('click', back);

  // ---- start --------------------------------------------------------------
  async function start() {
    if (!state.csrf) {
      showLogin('');
      return;
    }
    try {
      const r = await fetch('/api/me', { credentials: 'same-origin' });
      if (!r.ok) {
        setCsrf('', '');
        showLogin(r.status === 401 ? 'Your session has expired. Please log in again.' : '');
        return;
      }
      const me = await r.json();
      state.user = me.username;
      if (me.must_change_password) {
        show('password-view');
        return;
      }
      enterList();
    } catch (_) {
      showLogin('The server could not be reached.');
    }
  }
  start();
}());
