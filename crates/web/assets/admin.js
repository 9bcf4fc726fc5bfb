// Bastion web UI, administration and security pages: devices, users,
// alerts, audit trail, posture. Registered with window.BastionUI (app.js),
// which does the routing, the session and the CSRF header. Only the
// public JSON API is used (/api/devices, /api/users, /api/alerts,
// /api/audit, /api/posture).
'use strict';

(function () {
  const ui = window.BastionUI;
  const { $, api, apiJson, message, failure, register, cell, when, confirmAction } = ui;

  function refusedTo(errorId, bodyIds) {
    return () => {
      for (const id of bodyIds) $(id).tBodies[0].replaceChildren();
      message($(errorId), 'Your role does not give access to this page.');
    };
  }
  function button(text, onClick, cls) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = text;
    b.className = cls || 'quiet small';
    b.addEventListener('click', onClick);
    return b;
  }
  function tag(text, cls) {
    const s = document.createElement('span');
    s.className = `tag ${cls || ''}`.trim();
    s.textContent = text;
    return s;
  }
  async function guarded(errorId, f) {
    message($(errorId), '');
    try {
      return await f();
    } catch (e) {
      const text = failure(e);
      if (text) message($(errorId), text);
      return undefined;
    }
  }

  // ---- devices --------------------------------------------------------------
  let editing = null; // AE title being edited, or null for a new device

  async function loadDevices() {
    await guarded('devices-error', async () => {
      const [devices, unknown] = await Promise.all([
        apiJson('/api/devices'), apiJson('/api/devices/unknown'),
      ]);
      const body = $('devices').tBodies[0];
      body.replaceChildren();
      for (const d of devices) {
        const tr = document.createElement('tr');
        tr.dataset.ae = d.ae;
        cell(tr, d.ae).className = 'strong';
        cell(tr, d.network);
        const t = cell(tr, '');
        t.appendChild(tag(d.transport, d.plaintext ? 'warn' : 'ok'));
        if (d.plaintext) t.appendChild(tag('unencrypted', 'warn'));
        cell(tr, (d.allow || []).join(', '));
        const inv = d.inventory;
        const h = inv ? (inv.headers || inv) : null;
        cell(tr, h ? [h.manufacturer, h.model, h.software_versions && `sw ${h.software_versions}`]
          .filter(Boolean).join(' · ') : 'nothing stored yet');
        cell(tr, inv ? `${when(inv.first_seen)}\n${when(inv.last_seen)}` : '', 'pre');
        const lr = d.last_rejected;
        cell(tr, lr ? `${when(lr.at)}: ${lr.reason.replaceAll('_', ' ').replace(':', ': ')}`
          + `${lr.address ? ` (${lr.address})` : ''}` : '');
        const actions = cell(tr, '', 'actions');
        actions.appendChild(button('Edit', () => editDevice(d)));
        actions.appendChild(button('Remove', () => removeDevice(d.ae), 'quiet small danger'));
        body.appendChild(tr);
      }
      $('devices-empty').hidden = devices.length > 0;
      const ub = $('unknown').tBodies[0];
      ub.replaceChildren();
      for (const u of unknown) {
        const tr = document.createElement('tr');
        cell(tr, u.address);
        cell(tr, (u.ae_titles || []).join(', '));
        cell(tr, u.attempts, 'num');
        cell(tr, when(u.first_attempt));
        cell(tr, when(u.last_attempt));
        ub.appendChild(tr);
      }
      $('unknown-empty').hidden = unknown.length > 0;
    });
  }

  function perms() {
    return [...$('device-form').querySelectorAll('.perms input')];
  }
  function editDevice(d) {
    editing = d ? d.ae : null;
    $('device-form-title').textContent = d ? `Change ${d.ae}` : 'Add a device';
    $('dev-ae').value = d ? d.ae : '';
    $('dev-ae').disabled = Boolean(d);
    $('dev-network').value = d ? d.network : '';
    $('dev-transport').value = d ? d.transport : 'tls';
    for (const c of perms()) c.checked = d ? (d.allow || []).includes(c.value) : c.value === 'echo';
    $('dev-host').value = d && d.host ? d.host : '';
    $('dev-port').value = d && d.port ? String(d.port) : '';
    message($('devices-notice'), '');
    $('device-form').hidden = false;
    (d ? $('dev-network') : $('dev-ae')).focus();
  }
  async function removeDevice(ae) {
    if (!await confirmAction(`Remove device ${ae}? It will no longer be able to connect.`)) return;
    await guarded('devices-error', async () => {
      await api(`/api/devices/${encodeURIComponent(ae)}`, { method: 'DELETE' });
      message($('devices-notice'), `Device ${ae} removed.`);
      await loadDevices();
    });
  }
  $('device-new').addEventListener('click', () => editDevice(null));
  $('device-cancel').addEventListener('click', () => { $('device-form').hidden = true; });
  $('device-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const body = {
      network: $('dev-network').value.trim(),
      transport: $('dev-transport').value,
      allow: perms().filter((c) => c.checked).map((c) => c.value),
    };
    const host = $('dev-host').value.trim();
    const port = $('dev-port').value.trim();
    // Emptied fields clear the setting when editing.
    if (host) body.host = host; else if (editing) body.host = null;
    if (port) body.port = Number(port); else if (editing) body.port = null;
    const ae = editing || $('dev-ae').value.trim();
    if (!body.allow.length) {
      message($('devices-error'), 'Tick at least one allowed service (echo lets the device test its connection).');
      return;
    }
    if (/\/0$/.test(body.network) && !await confirmAction(
      `${body.network} lets ${ae} connect from any address. Give its own address (e.g. 10.0.5.20/32) unless it really moves. Continue?`)) return;
    const what = editing ? `Save the changes to ${ae}?` : `Allow device ${ae} (${body.network}, ${body.transport}) to connect?`;
    if (body.transport === 'plain' && !await confirmAction(
      `${ae} would send patient data unencrypted. Use plain only for old devices that cannot do TLS. Continue?`)) return;
    if (!await confirmAction(what)) return;
    await guarded('devices-error', async () => {
      if (editing) {
        await api(`/api/devices/${encodeURIComponent(ae)}`, { method: 'PUT', json: body });
      } else {
        await api('/api/devices', { method: 'POST', json: Object.assign({ ae }, body) });
      }
      $('device-form').hidden = true;
      message($('devices-notice'), editing ? `Device ${ae} changed.` : `Device ${ae} added.`);
      await loadDevices();
    });
  });
  register('devices', {
    view: 'devices-view',
    needs: 'admin',
    enter() { $('device-form').hidden = true; loadDevices(); },
    refused: refusedTo('devices-error', ['devices', 'unknown']),
  });

  // ---- users ----------------------------------------------------------------
  async function loadUsers() {
    await guarded('users-error', async () => {
      const users = await apiJson('/api/users');
      const body = $('users').tBodies[0];
      body.replaceChildren();
      for (const u of users) {
        const tr = document.createElement('tr');
        tr.dataset.user = u.username;
        cell(tr, u.username).className = 'strong';
        cell(tr, u.role);
        const st = cell(tr, '');
        if (u.disabled) st.appendChild(tag('disabled', 'warn'));
        else if (u.locked) st.appendChild(tag('locked', 'warn'));
        else st.appendChild(tag('active', 'ok'));
        if (u.must_change_password) st.appendChild(tag('must change password'));
        const totp = u.totp_enabled !== undefined ? u.totp_enabled : u.totp;
        const t = cell(tr, '');
        t.appendChild(totp ? tag('on', 'ok') : tag(u.role === 'admin' ? 'off (required)' : 'off', u.role === 'admin' ? 'warn' : ''));
        cell(tr, when(u.created));
        const a = cell(tr, '', 'actions');
        if (u.username === ui.currentUser()) {
          // Not on oneself: disabling would lock you out, and your own
          // password is changed at the login page.
          a.appendChild(tag('you'));
          body.appendChild(tr);
          continue;
        }
        if (u.disabled) {
          a.appendChild(button('Enable', () => userAction(u.username, 'enable', `Enable ${u.username}?`)));
        } else {
          a.appendChild(button('Disable', () => userAction(u.username, 'disable',
            `Disable ${u.username}? Their sessions end and they can no longer log in.`), 'quiet small danger'));
        }
        if (u.locked) a.appendChild(button('Unlock', () => userAction(u.username, 'unlock', `Unlock ${u.username}?`)));
        a.appendChild(button('Reset password', () => userAction(u.username, 'password',
          `Reset the password of ${u.username}? A new one is generated and their sessions end.`)));
        body.appendChild(tr);
      }
    });
  }
  function showPassword(username, password, what) {
    const n = $('users-notice');
    n.replaceChildren();
    n.append(`${what} The password of ${username}, shown once: `);
    const code = document.createElement('code');
    code.className = 'secret';
    code.id = 'generated-password';
    code.textContent = password;
    n.append(code, ' — give it to the user; they must change it at the first login.');
    n.hidden = false;
  }
  async function userAction(username, action, question) {
    if (!await confirmAction(question)) return;
    await guarded('users-error', async () => {
      const r = await apiJson(`/api/users/${encodeURIComponent(username)}/${action}`, { method: 'POST' });
      if (action === 'password' && r && r.password) {
        showPassword(username, r.password, 'Password reset.');
      } else {
        message($('users-notice'), `${username}: ${action === 'disable' ? 'disabled' : action === 'enable' ? 'enabled' : 'unlocked'}.`);
      }
      await loadUsers();
    });
  }
  $('user-new').addEventListener('click', () => {
    $('user-form').reset();
    $('user-form').hidden = false;
    $('user-name').focus();
  });
  $('user-cancel').addEventListener('click', () => { $('user-form').hidden = true; });
  $('user-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const username = $('user-name').value.trim();
    const role = $('user-role').value;
    if (!await confirmAction(`Create ${username} with the role ${role}?`)) return;
    await guarded('users-error', async () => {
      const r = await apiJson('/api/users', { method: 'POST', json: { username, role } });
      $('user-form').hidden = true;
      showPassword(username, r.password, `User ${username} created.`);
      await loadUsers();
    });
  });
  register('users', {
    view: 'users-view',
    needs: 'admin',
    enter() { $('user-form').hidden = true; message($('users-notice'), ''); loadUsers(); },
    refused: refusedTo('users-error', ['users']),
  });

  // ---- alerts ---------------------------------------------------------------
  let currentAlert = null;

  async function loadAlerts() {
    await guarded('alerts-error', async () => {
      const all = $('alerts-all').checked;
      const alerts = await apiJson(`/api/alerts${all ? '?all=true' : ''}`);
      const body = $('alerts').tBodies[0];
      body.replaceChildren();
      for (const a of alerts) {
        const tr = document.createElement('tr');
        tr.tabIndex = 0;
        tr.dataset.id = String(a.id);
        tr.dataset.rule = a.rule;
        cell(tr, when(a.ts));
        cell(tr, '').appendChild(tag(a.severity, a.severity === 'high' ? 'warn' : a.severity === 'medium' ? 'mid' : ''));
        cell(tr, a.count > 1 ? `${a.summary} (×${a.count})` : a.summary);
        cell(tr, a.status);
        tr.addEventListener('click', () => openAlert(a.id));
        tr.addEventListener('keydown', (ev) => { if (ev.key === 'Enter') openAlert(a.id); });
        body.appendChild(tr);
      }
      $('alerts-empty').hidden = alerts.length > 0;
      $('ack-all-form').hidden = !alerts.some((a) => a.status === 'open');
    });
  }
  async function openAlert(id) {
    await guarded('alerts-error', async () => {
      const a = await apiJson(`/api/alerts/${id}`);
      currentAlert = a;
      for (const tr of $('alerts').tBodies[0].rows) tr.classList.toggle('selected', tr.dataset.id === String(id));
      $('alert-title').textContent = a.summary;
      const dl = $('alert-facts');
      dl.replaceChildren();
      const fact = (k, v) => {
        if (v === undefined || v === null || v === '') return;
        const dt = document.createElement('dt');
        dt.textContent = k;
        const dd = document.createElement('dd');
        dd.textContent = typeof v === 'object' ? JSON.stringify(v) : String(v);
        dl.append(dt, dd);
      };
      fact('Status', a.status);
      fact('Rule', a.rule);
      fact('Severity', a.severity);
      fact('When', when(a.ts));
      if (a.count > 1) fact('Findings', `${a.count}, the latest ${when(a.last_ts)}`);
      for (const [k, v] of Object.entries(a.details || {})) {
        if (k !== 'evidence') fact(k.replaceAll('_', ' '), v);
      }
      if (a.ack) fact('Acknowledged', `${when(a.ack.ts)} by ${a.ack.by}: ${a.ack.comment}`);
      const eb = $('evidence').tBodies[0];
      eb.replaceChildren();
      for (const e of a.evidence || []) {
        const tr = document.createElement('tr');
        cell(tr, when(e.ts));
        cell(tr, e.type);
        cell(tr, e.outcome);
        cell(tr, [e.actor && `by ${e.actor}`, e.user, e.ae, e.peer || e.source].filter(Boolean).join(' · '));
        eb.appendChild(tr);
      }
      $('ack-form').hidden = a.status !== 'open';
      $('ack-done').hidden = true;
      $('ack-comment').value = '';
      $('alert-detail').hidden = false;
      // On a narrow screen the detail is below the list: bring it into view.
      if (window.innerWidth <= 900) $('alert-detail').scrollIntoView({ block: 'start' });
    });
  }
  $('ack-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (!currentAlert) return;
    const comment = $('ack-comment').value.trim();
    await guarded('alerts-error', async () => {
      await api(`/api/alerts/${currentAlert.id}/ack`, { method: 'POST', json: { comment } });
      const id = currentAlert.id;
      await loadAlerts();
      await openAlert(id);
      message($('ack-done'), 'Acknowledged.');
    });
  });
  $('ack-all-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const comment = $('ack-all-comment').value.trim();
    await guarded('alerts-error', async () => {
      const r = await apiJson('/api/alerts/ack', { method: 'POST', json: { all: true, comment } });
      $('ack-all-comment').value = '';
      $('alert-detail').hidden = true;
      await loadAlerts();
      message($('ack-all-done'), `${r.count} alert(s) acknowledged.`);
    });
  });
  $('alerts-all').addEventListener('change', loadAlerts);
  register('alerts', {
    view: 'alerts-view',
    needs: 'audit',
    enter() { $('alert-detail').hidden = true; loadAlerts(); },
    refused: refusedTo('alerts-error', ['alerts']),
  });

  // ---- audit ----------------------------------------------------------------
  function isoOf(local) {
    if (!local) return '';
    const d = new Date(local);
    return Number.isNaN(d.getTime()) ? '' : d.toISOString();
  }
  async function chainStatus() {
    const el = $('chain-status');
    el.className = 'notice';
    el.textContent = 'Checking the audit trail…';
    try {
      const c = await apiJson('/api/audit/chain');
      el.className = c.ok ? 'notice ok' : 'error';
      el.textContent = c.ok
        ? `Audit trail intact: ${c.records} records, ${c.checkpoints} signed checkpoints`
          + (c.last_checkpoint ? `, last ${when(c.last_checkpoint)}` : '') + ` (checked ${when(c.checked_at)}).`
        : `Audit trail damaged: ${(c.problems || []).join('; ') || 'verification failed'}.`;
    } catch (e) {
      const text = failure(e);
      if (text) {
        el.className = 'error';
        el.textContent = `The audit trail could not be checked: ${text}`;
      }
    }
  }
  async function searchAudit() {
    const q = new URLSearchParams();
    const add = (k, id) => { const v = $(id).value.trim(); if (v) q.set(k, v); };
    add('user', 'a-user');
    add('device', 'a-device');
    add('patient_id', 'a-patient');
    add('study', 'a-study');
    add('event', 'a-event');
    const since = isoOf($('a-since').value);
    const until = isoOf($('a-until').value);
    if (since) q.set('since', since);
    if (until) q.set('until', until);
    q.set('limit', '500');
    await guarded('audit-error', async () => {
      const rows = await apiJson(`/api/audit?${q}`);
      rows.reverse(); // newest first
      const body = $('audit').tBodies[0];
      body.replaceChildren();
      for (const r of rows) {
        const tr = document.createElement('tr');
        tr.dataset.type = r.type || '';
        tr.dataset.events = (r.event_ids || []).map((e) => (typeof e === 'string' ? e : e.name || e.meaning || '')).join(' ');
        cell(tr, when(r.ts));
        const ev = r.event || {};
        cell(tr, [r.type, ev.action].filter(Boolean).join(' '));
        cell(tr, '').appendChild(tag(r.outcome || '', r.outcome === 'success' ? 'ok' : 'warn'));
        cell(tr, r.user || '');
        cell(tr, [r.device, r.peer].filter(Boolean).join(' · '));
        cell(tr, (r.studies || []).join('\n'), 'pre uid');
        body.appendChild(tr);
      }
      $('audit-empty').hidden = rows.length > 0;
      $('audit-count').textContent = rows.length ? `${rows.length} record${rows.length === 1 ? '' : 's'}, newest first${rows.length === 500 ? ' (the latest 500: narrow the search)' : ''}.` : '';
    });
  }
  $('audit-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    searchAudit();
  });
  register('audit', {
    view: 'audit-view',
    needs: 'audit',
    enter() { chainStatus(); searchAudit(); },
    refused: refusedTo('audit-error', ['audit']),
  });

  // ---- posture --------------------------------------------------------------
  async function loadPosture() {
    await guarded('posture-error', async () => {
      const p = await apiJson('/api/posture');
      const w = $('posture-warnings');
      w.replaceChildren();
      for (const text of p.warnings || []) {
        const li = document.createElement('li');
        li.textContent = text;
        w.appendChild(li);
      }
      if (!(p.warnings || []).length) {
        const li = document.createElement('li');
        li.className = 'ok';
        li.textContent = 'Nothing needs attention.';
        w.appendChild(li);
      }
      const lb = $('posture-listeners').tBodies[0];
      lb.replaceChildren();
      for (const l of p.listeners || []) {
        const tr = document.createElement('tr');
        cell(tr, l.name);
        cell(tr, l.address);
        cell(tr, '').appendChild(tag(l.exposure, l.exposure === 'loopback' ? 'ok' : l.exposure === 'private network' ? '' : 'warn'));
        cell(tr, '').appendChild(tag(l.tls ? 'TLS' : 'none', l.tls ? 'ok' : 'warn'));
        lb.appendChild(tr);
      }
      const facts = (id, pairs) => {
        const dl = $(id);
        dl.replaceChildren();
        for (const [k, v] of pairs) {
          const dt = document.createElement('dt');
          dt.textContent = k;
          const dd = document.createElement('dd');
          dd.textContent = v;
          dl.append(dt, dd);
        }
      };
      const cert = (c) => (c ? `until ${when(c.not_after)} (${c.days_left} days)` : 'unknown');
      facts('posture-certs', [
        ['Server certificate', cert(p.server_certificate)],
        ['Certificate authority', cert(p.ca_certificate)],
      ]);
      facts('posture-accounts', [
        ['Unencrypted (plain) devices', (p.plaintext_devices || []).join(', ') || 'none'],
        ['Administrators without two-factor', (p.admins_without_totp || []).join(', ') || 'none'],
        ['Two-factor required for administrators', p.admin_requires_totp ? 'yes' : 'no'],
        ['Open alerts', String(p.open_alerts ?? 0)],
      ]);
      const a = p.audit || {};
      const exp = a.syslog_export;
      facts('posture-audit', [
        ['Audit trail', a.recording === false ? `NOT recording: ${a.reason || 'unknown reason'}` : 'recording'],
        ['While it cannot record', a.allow_unaudited_access ? 'patient data is served without audit records' : 'patient data is refused'],
        ['Syslog export', exp ? (exp.exporting ? 'exporting' : `stopped: ${exp.reason || 'unknown reason'}`) : 'not configured'],
      ]);
    });
  }
  register('posture', {
    view: 'posture-view',
    needs: 'admin',
    enter: loadPosture,
    refused: () => message($('posture-error'), 'Your role does not give access to this page.'),
  });
}());
