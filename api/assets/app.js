// upline dashboard (SPEC §8): plain JavaScript, no build step, no CDN.
//
// Sign in with a user token (or the admin key, then pick a user); the page loads the user's
// earnings and referrals over the REST API, then follows the notifier's WebSocket (SPEC §5):
// `subscribe` with `since` = the last `seq` the page has, so a reconnect replays exactly what was
// missed. Money stays a decimal string for display; sums for the bar chart use integer paise.
//
// Each event is a ledger entry (contract §10): a commission, a reversal (negative), an approval
// (pending → approved) or a payout (approved → paid); its `totals` carry the money by state. The
// legs chart (one bar per direct referral, stacked by level) comes from the report's `by_leg`,
// fetched again shortly after events arrive.
'use strict';

(() => {
  const KEY_TOKEN = 'upline.token';
  const KEY_VIEW = 'upline.viewUser';
  const KEY_PRODUCER = 'upline.producerKey';
  const FEED_MAX = 50;
  const STATES = ['pending', 'approved', 'paid', 'reversed'];
  const KINDS = ['commission', 'reversal', 'approval', 'payout'];
  /** How long after an event the report (for the legs chart) is fetched again, at most once. */
  const REPORT_DEBOUNCE = 250;
  const BACKOFF_MIN = 1000;
  const BACKOFF_MAX = 15000;
  const LEVEL_COLORS = ['#4f46e5', '#06b6d4', '#f59e0b', '#10b981', '#ef4444',
    '#8b5cf6', '#ec4899', '#84cc16', '#f97316', '#64748b'];

  const $ = (id) => document.getElementById(id);
  const levelColor = (level) => LEVEL_COLORS[(Number(level) - 1) % LEVEL_COLORS.length];

  /** Everything the page knows; exposed as `window.upline` for debugging and the browser test. */
  const app = {
    config: { notifier_ws_url: null, notifier_port: 8081 },
    token: null,
    role: null,
    users: [],          // admin: every user, for the picker
    user: null,         // the user whose dashboard is shown
    levels: [],         // ["1", "2", …] from by_level
    total: '0.00',
    levelTotals: {},    // "1" -> "100.00"
    count: 0,
    balances: { pending: '0.00', approved: '0.00', paid: '0.00', reversed: '0.00' },
    lastSeq: 0,
    people: new Map(),  // user id -> {name, level, is_active, referrer_id}
    names: new Map(),   // buyer id -> name, from the report's by_referral
    legs: [],           // the report's by_leg: [{leg_user_id, name, total, count, by_level}]
    report: { timer: null, running: false, again: false }, // re-fetching the report
    charts: { levels: null, legs: null },
    socket: null,
    connState: 'idle',
    gen: 0,             // bumped on every sign-in / user switch: stale callbacks check it
    backoff: BACKOFF_MIN,
    retryTimer: null,
    renewTimer: null,   // user sessions: renews the token before it expires
    countdownTimer: null,
    refreshingReferrals: null,
    lookedUp: new Set(), // buyers whose names were looked up once
  };
  window.upline = app;

  // ---------------------------------------------------------------- money (strings, paise)

  /** "1234.5" -> 123450 (integer paise); null when not a decimal string. */
  function toPaise(value) {
    const m = /^(-)?(\d+)(?:\.(\d{0,2}))?$/.exec(String(value).trim());
    if (!m) return null;
    const paise = Number(m[2]) * 100 + Number((m[3] || '').padEnd(2, '0'));
    return m[1] ? -paise : paise;
  }

  /** 123450 -> "1234.50" */
  function paiseToString(paise) {
    const sign = paise < 0 ? '-' : '';
    const abs = Math.abs(Math.round(paise));
    return `${sign}${Math.floor(abs / 100)}.${String(abs % 100).padStart(2, '0')}`;
  }

  /** "123456.5" -> "₹1,23,456.50" (Indian digit grouping), without going through floats. */
  function formatMoney(value) {
    const m = /^(-)?(\d+)(?:\.(\d*))?$/.exec(String(value ?? '').trim());
    if (!m) return String(value ?? '—');
    let int = m[2].replace(/^0+(?=\d)/, '');
    const frac = (m[3] || '').padEnd(2, '0');
    if (int.length > 3) {
      const head = int.slice(0, -3).replace(/\B(?=(\d{2})+(?!\d))/g, ',');
      int = `${head},${int.slice(-3)}`;
    }
    return `${m[1] ? '−' : ''}₹${int}.${frac}`;
  }

  // ---------------------------------------------------------------- REST

  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail);
      this.status = status;
      this.code = code;
      this.detail = detail;
    }
  }

  /** fetch + JSON; errors carry the problem+json `detail` and `code`. */
  async function api(path, { method = 'GET', token = app.token, body } = {}) {
    const headers = { Accept: 'application/json' };
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(path, {
        method, headers, cache: 'no-store',
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new ApiError(0, 'network', `The api could not be reached (${e.message}).`);
    }
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
    if (!res.ok) {
      const detail = (data && (data.detail || data.title)) || `HTTP ${res.status}`;
      throw new ApiError(res.status, data && data.code, detail);
    }
    return data;
  }

  // ---------------------------------------------------------------- views

  function show(view) {
    for (const id of ['signin-view', 'picker-view', 'dashboard-view']) $(id).hidden = true;
    for (const id of view) $(id).hidden = false;
    $('session-bar').hidden = !app.token;
  }

  function banner(message) {
    $('banner').textContent = message || '';
    $('banner').hidden = !message;
  }

  function showSignIn(message) {
    show(['signin-view']);
    $('signin-error').textContent = message || '';
    $('signin-error').hidden = !message;
    $('token').value = '';
    $('token').focus();
  }

  async function signIn(token, { restoring = false } = {}) {
    $('signin-submit').disabled = true;
    try {
      const me = await api('/api/me', { token });
      if (me.role === 'producer') {
        showSignIn('That is the producer key: it can send purchases but has no dashboard. '
          + 'Sign in with a user token or the admin key.');
        return;
      }
      app.token = token;
      app.role = me.role;
      sessionStorage.setItem(KEY_TOKEN, token);
      banner('');
      if (me.role === 'admin') {
        $('whoami').textContent = 'Signed in as admin';
        show(['picker-view']);
        const saved = Number(sessionStorage.getItem(KEY_VIEW));
        await loadUsers(saved || null);
        if (saved && app.role === 'admin') await openUser(saved);
      } else {
        $('whoami').textContent = `Signed in as ${me.user.name} (#${me.user.id})`;
        scheduleRenewal(me.user.id);
        await openUser(me.user.id, me.user);
      }
    } catch (e) {
      if (e.status === 401 || e.status === 403) {
        sessionStorage.removeItem(KEY_TOKEN);
        showSignIn(restoring ? 'Your saved token is no longer accepted; sign in again.'
          : 'That token is not valid.');
      } else if (restoring) {
        show([]);
        $('session-bar').hidden = true;
        banner(`${e.detail} Reload the page to try again.`);
      } else {
        showSignIn(e.detail);
      }
    } finally {
      $('signin-submit').disabled = false;
    }
  }

  /** When a user token (a JWT) expires, in milliseconds since the epoch; null if unknown. */
  function tokenExpiry(token) {
    try {
      const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
      const { exp } = JSON.parse(atob(part.padEnd(Math.ceil(part.length / 4) * 4, '=')));
      return typeof exp === 'number' ? exp * 1000 : null;
    } catch {
      return null;
    }
  }

  /** User tokens expire (auth.token_ttl): renew once 80 % of the lifetime has passed. */
  function scheduleRenewal(userId) {
    clearTimeout(app.renewTimer);
    const expires = tokenExpiry(app.token);
    if (!expires) return;
    const delay = Math.max(1000, (expires - Date.now()) * 0.8);
    app.renewTimer = setTimeout(() => renewToken(userId), Math.min(delay, 2 ** 31 - 1));
  }

  async function renewToken(userId) {
    if (app.role !== 'user') return;
    try {
      const issued = await api(`/api/users/${userId}/token`, { method: 'POST' });
      if (app.role !== 'user') return;
      app.token = issued.token;
      sessionStorage.setItem(KEY_TOKEN, issued.token);
      scheduleRenewal(userId);
    } catch (e) {
      if (e.status === 401 || e.status === 403) sessionEnded(e.code);
      else app.renewTimer = setTimeout(() => renewToken(userId), 10000); // unreachable: retry
    }
  }

  /** The session's token expired or was revoked (signed out everywhere, deactivated, erased). */
  function sessionEnded(code) {
    signOut();
    showSignIn(code === 'token_expired' ? 'Your session has expired; sign in again.'
      : 'Your session was ended (signed out everywhere, deactivated or erased); sign in again.');
  }

  function signOut() {
    app.gen += 1;
    clearTimeout(app.report.timer);
    app.report = { timer: null, running: false, again: false };
    clearTimeout(app.renewTimer);
    closeSocket();
    setConn('idle', 'not connected');
    destroyCharts();
    for (const key of [KEY_TOKEN, KEY_VIEW, KEY_PRODUCER]) sessionStorage.removeItem(key);
    Object.assign(app, { token: null, role: null, user: null, users: [] });
    $('producer-key').value = '';
    $('purchase-result').hidden = true;
    banner('');
    showSignIn();
  }

  // ---------------------------------------------------------------- admin: user picker

  async function loadUsers(selected) {
    const gen = app.gen;
    $('picker-status').textContent = 'Loading users…';
    const all = [];
    let cursor = null;
    do {
      const query = new URLSearchParams({ limit: '500' });
      if (cursor) query.set('cursor', cursor);
      // eslint-disable-next-line no-await-in-loop
      const page = await api(`/api/users?${query}`);
      if (gen !== app.gen) return;
      all.push(...page.items);
      cursor = page.next_cursor;
      $('picker-status').textContent = `Loading users… ${all.length}`;
    } while (cursor);
    app.users = all;
    renderUserOptions(selected);
  }

  function renderUserOptions(selected) {
    const filter = $('user-filter').value.trim().toLowerCase();
    const select = $('user-select');
    const current = selected ?? (Number(select.value) || null);
    const matches = app.users.filter((u) => !filter
      || u.name.toLowerCase().includes(filter)
      || (u.email || '').toLowerCase().includes(filter)
      || String(u.id) === filter.replace(/^#/, ''));
    const shown = matches.slice(0, 500);
    select.replaceChildren(new Option('— choose a user —', ''));
    for (const u of shown) {
      const label = `${u.name} · #${u.id}${u.is_active ? '' : ' · inactive'} · ${u.email ?? 'erased'}`;
      select.add(new Option(label, String(u.id), false, u.id === current));
    }
    $('picker-status').textContent = `${app.users.length} users`
      + (filter ? ` · ${matches.length} match` : '')
      + (matches.length > shown.length ? ` · showing the first ${shown.length}; filter to narrow` : '');
  }

  function pickUser() {
    const id = Number($('user-select').value);
    if (id && (!app.user || app.user.id !== id || $('dashboard-view').hidden)) openUser(id);
  }

  // ---------------------------------------------------------------- the dashboard

  async function openUser(id, knownUser) {
    const gen = ++app.gen;
    clearTimeout(app.report.timer);
    app.report = { timer: null, running: false, again: false };
    closeSocket();
    clearTimeout(app.retryTimer);
    banner('');
    try {
      const [user, earnings, referrals] = await Promise.all([
        knownUser ? Promise.resolve(knownUser) : api(`/api/users/${id}`),
        api(`/api/users/${id}/earnings`),
        api(`/api/users/${id}/referrals`),
      ]);
      if (gen !== app.gen) return;
      if (app.role === 'admin') sessionStorage.setItem(KEY_VIEW, String(id));
      render(user, earnings, referrals);
      show(app.role === 'admin' ? ['picker-view', 'dashboard-view'] : ['dashboard-view']);
      connect(gen);
    } catch (e) {
      if (gen !== app.gen) return;
      if (app.role === 'admin') {
        sessionStorage.removeItem(KEY_VIEW);
        show(['picker-view']);
      } else {
        show([]);
      }
      banner(`Could not load the dashboard of user #${id}: ${e.detail}`);
    }
  }

  function render(user, earnings, referrals) {
    app.user = user;
    app.levels = Object.keys(earnings.by_level).sort((a, b) => Number(a) - Number(b));
    app.total = earnings.total;
    app.levelTotals = { ...earnings.by_level };
    app.count = earnings.count ?? 0;
    setBalances(earnings);
    app.lastSeq = earnings.recent.reduce((max, e) => Math.max(max, e.seq), 0);

    $('user-name').textContent = user.name;
    const meta = [`#${user.id}`];
    if (user.referral_code) meta.push(`referral code ${user.referral_code}`);
    meta.push(user.referrer_id ? `referred by #${user.referrer_id}` : 'no referrer');
    meta.push(user.is_active ? 'active' : 'inactive');
    if (user.created_at) meta.push(`joined ${new Date(user.created_at).toLocaleDateString()}`);
    $('user-meta').textContent = meta.join(' · ');

    setPeople(referrals);
    app.names = new Map();
    app.lookedUp = new Set();
    setLegs(earnings);

    renderCounters();
    renderTree(referrals);
    renderBuyers(referrals);
    renderCharts();
    $('feed').replaceChildren();
    for (const e of earnings.recent) $('feed').append(feedItem(e, false));
    $('feed-empty').hidden = earnings.recent.length > 0;
    $('producer-key-row').hidden = app.role === 'admin';
    $('producer-key').value = sessionStorage.getItem(KEY_PRODUCER) || '';
    $('purchase-result').hidden = true;
  }

  function setPeople(referrals) {
    app.people = new Map();
    for (const [level, list] of [[1, referrals.level_1], [2, referrals.level_2]]) {
      for (const r of list) app.people.set(r.id, { ...r, level });
    }
  }

  /** The money by state from a report or an event's `totals`; absent values stay as they are. */
  function setBalances(from) {
    for (const state of STATES) {
      if (typeof from[state] === 'string') app.balances[state] = from[state];
    }
  }

  /** The legs and the buyers' names from an earnings report. */
  function setLegs(earnings) {
    app.legs = Array.isArray(earnings.by_leg) ? earnings.by_leg : [];
    for (const row of earnings.by_referral || []) app.names.set(row.source_user_id, row.name);
    for (const leg of app.legs) app.names.set(leg.leg_user_id, leg.name);
  }

  function personName(id) {
    const known = app.people.get(id);
    if (known && known.name) return known.name;
    return app.names.get(id) || `User #${id}`;
  }

  // counters

  function renderCounters() {
    const box = $('counters');
    for (const el of box.querySelectorAll('.counter-level')) el.remove();
    for (const level of app.levels) {
      const card = document.createElement('div');
      card.className = 'counter counter-level';
      card.dataset.level = level;
      card.style.setProperty('--level-color', levelColor(level));
      const label = document.createElement('span');
      label.className = 'counter-label';
      label.textContent = `Level ${level}`;
      const value = document.createElement('span');
      value.className = 'counter-value';
      value.id = `level-${level}`;
      const sub = document.createElement('span');
      sub.className = 'counter-sub';
      sub.textContent = level === '1' ? 'from direct referrals'
        : `from referrals ${level} levels down`;
      card.append(label, value, sub);
      box.append(card);
    }
    updateCounters(false);
  }

  function updateCounters(flash) {
    setMoney($('total'), app.total, flash);
    $('total-count').textContent = `${app.count} earning${app.count === 1 ? '' : 's'}`;
    for (const level of app.levels) {
      const el = $(`level-${level}`);
      const before = el.dataset.value;
      setMoney(el, app.levelTotals[level] ?? '0.00', flash && before !== (app.levelTotals[level] ?? '0.00'));
    }
    for (const state of STATES) {
      const el = $(`state-${state}`);
      const before = el.dataset.value;
      setMoney(el, app.balances[state], flash && before !== app.balances[state]);
    }
  }

  function setMoney(el, value, flash) {
    el.dataset.value = value;
    el.textContent = formatMoney(value);
    if (flash) {
      const card = el.closest('.counter');
      card.classList.remove('flash');
      void card.offsetWidth; // restart the animation
      card.classList.add('flash');
    }
  }

  // referral tree

  function treeNode(person, { root = false } = {}) {
    const li = document.createElement('li');
    const row = document.createElement('div');
    row.className = `tree-node ${root ? 'root' : (person.is_active ? 'active' : 'inactive')}`;
    row.dataset.userId = String(person.id);
    const dot = document.createElement('span');
    dot.className = `dot ${person.is_active ? 'dot-active' : 'dot-inactive'}`;
    const name = document.createElement('span');
    name.className = 'tree-name';
    name.textContent = person.name;
    name.title = `${person.name} (#${person.id})`;
    row.append(dot, name);
    if (!person.is_active) {
      const badge = document.createElement('span');
      badge.className = 'tree-badge';
      badge.textContent = 'inactive';
      row.append(badge);
    }
    const meta = document.createElement('span');
    meta.className = 'tree-meta';
    const n = person.direct_referrals ?? 0;
    meta.textContent = `#${person.id} · ${n} referral${n === 1 ? '' : 's'}`;
    row.append(meta);
    li.append(row);
    return li;
  }

  function renderTree(referrals) {
    const rootList = document.createElement('ul');
    const root = treeNode(app.user, { root: true });
    rootList.append(root);
    const children = document.createElement('ul');
    for (const l1 of referrals.level_1) {
      const li = treeNode(l1);
      const below = referrals.level_2.filter((l2) => l2.referrer_id === l1.id);
      if (below.length) {
        const sub = document.createElement('ul');
        for (const l2 of below) sub.append(treeNode(l2));
        li.append(sub);
      }
      children.append(li);
    }
    if (referrals.level_1.length) root.append(children);
    $('tree').replaceChildren(rootList);
    if (!referrals.level_1.length) {
      const p = document.createElement('p');
      p.className = 'muted small';
      p.textContent = app.user.referral_code
        ? `No referrals yet. Share the referral code ${app.user.referral_code}.`
        : 'No referrals yet.';
      $('tree').append(p);
    }
  }

  function renderBuyers(referrals) {
    const select = $('buyer');
    const previous = Number(select.value) || null;
    select.replaceChildren();
    for (const [level, list] of [[1, referrals.level_1], [2, referrals.level_2]]) {
      for (const r of list) {
        const label = `${r.name} (#${r.id}) · level ${level}${r.is_active ? '' : ' · inactive'}`;
        select.add(new Option(label, String(r.id), false, r.id === previous));
      }
    }
    const none = select.options.length === 0;
    if (none) select.add(new Option('No referrals yet', ''));
    select.disabled = none;
    $('purchase-submit').disabled = none;
  }

  /** A buyer we have no name for: someone joined since the page loaded. */
  function refreshReferrals() {
    if (app.refreshingReferrals) return;
    const gen = app.gen;
    const id = app.user.id;
    app.refreshingReferrals = api(`/api/users/${id}/referrals`).then((referrals) => {
      if (gen !== app.gen) return;
      setPeople(referrals);
      renderTree(referrals);
      renderBuyers(referrals);
    }).catch(() => {}).finally(() => { app.refreshingReferrals = null; });
  }

  // charts

  function destroyCharts() {
    for (const key of ['levels', 'legs']) {
      if (app.charts[key]) app.charts[key].destroy();
      app.charts[key] = null;
    }
  }

  const centerText = {
    id: 'uplineCenterText',
    afterDraw(chart) {
      const { ctx, chartArea } = chart;
      if (!chartArea) return;
      const x = (chartArea.left + chartArea.right) / 2;
      const y = (chartArea.top + chartArea.bottom) / 2;
      ctx.save();
      ctx.textAlign = 'center';
      ctx.textBaseline = 'middle';
      ctx.fillStyle = '#6b7192';
      ctx.font = '600 11px system-ui, sans-serif';
      ctx.fillText('TOTAL', x, y - 12);
      ctx.fillStyle = '#1b1f3a';
      ctx.font = '700 17px system-ui, sans-serif';
      ctx.fillText(formatMoney(app.total), x, y + 8);
      ctx.restore();
    },
  };

  function moneyTick(value) {
    return formatMoney(paiseToString(Math.round(Number(value) * 100))).replace(/\.00$/, '');
  }

  function renderCharts() {
    destroyCharts();
    if (typeof window.Chart !== 'function') {
      banner('The chart library did not load; counters, tree and feed still update live.');
      return;
    }
    const { Chart } = window;
    Chart.defaults.font.family = getComputedStyle(document.documentElement).fontFamily;
    Chart.defaults.color = '#6b7192';
    app.charts.levels = new Chart($('chart-levels'), {
      type: 'doughnut',
      data: { labels: [], datasets: [{ data: [], backgroundColor: [], borderWidth: 2, borderColor: '#fff' }] },
      options: {
        maintainAspectRatio: false,
        cutout: '68%',
        plugins: {
          legend: { position: 'bottom', labels: { usePointStyle: true, boxWidth: 8 } },
          tooltip: { callbacks: { label: (c) => ` ${c.label}: ${formatMoney(app.levelTotals[app.levels[c.dataIndex]])}` } },
        },
      },
      plugins: [centerText],
    });
    app.charts.legs = new Chart($('chart-legs'), {
      type: 'bar',
      data: { labels: [], datasets: [] },
      options: {
        maintainAspectRatio: false,
        scales: {
          x: { stacked: true, grid: { display: false }, ticks: { autoSkip: true, maxRotation: 45 } },
          y: { stacked: true, beginAtZero: true, ticks: { callback: moneyTick }, grid: { color: '#eef0f6' } },
        },
        plugins: {
          legend: { position: 'bottom', labels: { usePointStyle: true, boxWidth: 8 } },
          tooltip: {
            callbacks: {
              label: (c) => ` ${c.dataset.label}: ${formatMoney(paiseToString(Math.round(c.raw * 100)))}`,
            },
          },
        },
      },
    });
    updateDoughnut();
    updateBarChart();
  }

  function updateDoughnut() {
    const chart = app.charts.levels;
    if (!chart) return;
    chart.data.labels = app.levels.map((l) => `Level ${l}`);
    const ds = chart.data.datasets[0];
    ds.data = app.levels.map((l) => (toPaise(app.levelTotals[l] ?? '0') || 0) / 100);
    ds.backgroundColor = app.levels.map(levelColor);
    ds.borderWidth = ds.data.filter((v) => v > 0).length > 1 ? 2 : 0; // no seam in a full ring
    chart.update();
  }

  /** One bar per leg (a direct referral and everyone below them), stacked by level. */
  function updateBarChart() {
    const chart = app.charts.legs;
    $('legs-chart-empty').hidden = app.legs.length > 0;
    if (!chart) return;
    const levels = new Set(app.levels);
    for (const leg of app.legs) for (const l of Object.keys(leg.by_level || {})) levels.add(l);
    const levelList = [...levels].sort((a, b) => Number(a) - Number(b));
    chart.data.labels = app.legs.map((leg) => `${leg.name} #${leg.leg_user_id}`);
    chart.data.datasets = levelList.map((level) => {
      const existing = chart.data.datasets.find((d) => d.level === level);
      const ds = existing || {
        level, label: `Level ${level}`, backgroundColor: levelColor(level), borderRadius: 5, maxBarThickness: 56,
      };
      ds.data = app.legs.map((leg) => (toPaise(leg.by_level?.[level] ?? '0') || 0) / 100);
      return ds;
    });
    chart.update();
  }

  /**
   * Fetches the report again for the legs (and the commission count), shortly after events:
   * at most one request at a time, and one more if events arrived while it ran.
   */
  function scheduleReportRefresh() {
    if (app.report.running) {
      app.report.again = true;
      return;
    }
    clearTimeout(app.report.timer);
    app.report.timer = setTimeout(refreshReport, REPORT_DEBOUNCE);
  }

  async function refreshReport() {
    if (!app.user) return;
    const gen = app.gen;
    const state = app.report;
    state.running = true;
    state.again = false;
    try {
      const earnings = await api(`/api/users/${app.user.id}/earnings`);
      if (gen !== app.gen) return;
      setLegs(earnings);
      if (typeof earnings.count === 'number' && earnings.count !== app.count) {
        app.count = earnings.count;
        updateCounters(false);
      }
      updateBarChart();
    } catch {
      // The next event tries again; the counters and the feed follow the events regardless.
    } finally {
      state.running = false;
      if (state.again && state === app.report) scheduleReportRefresh();
    }
  }

  // feed

  /** "commission" for events from before contract §10, which carry no kind. */
  const kindOf = (e) => (KINDS.includes(e.kind) ? e.kind : 'commission');

  /** The amount as the feed shows it: credited +, clawed back −, moved between states as is. */
  function feedAmount(e, kind) {
    if (kind === 'commission') return `+${formatMoney(e.amount)}`;
    if (kind === 'reversal') {
      const paise = toPaise(e.amount);
      return formatMoney(paise !== null && paise > 0 ? `-${e.amount}` : e.amount);
    }
    return formatMoney(e.amount);
  }

  /** What the entry is, in words. */
  function feedText(e, kind) {
    const from = e.source_user_id ? ` from ${personName(e.source_user_id)} (#${e.source_user_id})` : '';
    switch (kind) {
      case 'reversal':
        return `of commission #${e.refers_to ?? '?'}${from}`;
      case 'approval':
        return `commission #${e.refers_to ?? '?'}${from}: pending → approved`;
      case 'payout':
        return `batch #${e.payout_id ?? '?'}: approved → paid`;
      default:
        return from.trim();
    }
  }

  function feedItem(e, fresh) {
    const kind = kindOf(e);
    const li = document.createElement('li');
    li.dataset.seq = String(e.seq);
    li.dataset.kind = kind;
    if (e.purchase_id) li.dataset.purchaseId = e.purchase_id;
    li.dataset.amount = e.amount;
    li.className = `feed-${kind}${fresh ? ' new' : ''}`;
    const amount = document.createElement('span');
    amount.className = 'feed-amount';
    amount.textContent = feedAmount(e, kind);
    const what = document.createElement('span');
    what.className = 'feed-what';
    const kindChip = document.createElement('span');
    kindChip.className = `kind-chip kind-${kind}`;
    kindChip.textContent = kind;
    what.append(kindChip);
    if (e.level) {
      const chip = document.createElement('span');
      chip.className = 'level-chip';
      chip.style.setProperty('--level-color', levelColor(e.level));
      chip.textContent = `L${e.level}`;
      what.append(chip);
    }
    const text = document.createElement('span');
    text.textContent = feedText(e, kind);
    what.append(text);
    const when = document.createElement('span');
    when.className = 'feed-when';
    const at = new Date(e.created_at);
    const sameDay = at.toDateString() === new Date().toDateString();
    const time = Number.isNaN(at.getTime()) ? '' : (sameDay ? at.toLocaleTimeString() : at.toLocaleString());
    const parts = [time];
    if (kind === 'commission' && e.rate) parts.push(`${(Number(e.rate) * 100).toFixed(2).replace(/\.?0+$/, '')} %`);
    if (e.purchase_id) parts.push(`purchase ${e.purchase_id}`);
    if (e.refund_id) parts.push(`refund ${e.refund_id}`);
    when.textContent = parts.filter(Boolean).join(' · ');
    when.title = `${kind} · earning ${e.earning_id} · seq ${e.seq}`
      + (e.purchase_id ? ` · purchase ${e.purchase_id}` : '')
      + (e.refund_id ? ` · refund ${e.refund_id}` : '')
      + (e.payout_id ? ` · payout ${e.payout_id}` : '');
    li.append(amount, what, when);
    return li;
  }

  function onEarning(e) {
    if (!app.user || e.earner_id !== app.user.id) return;
    if (e.seq <= app.lastSeq) return; // already shown (replay overlap)
    app.lastSeq = e.seq;
    const kind = kindOf(e);
    const totals = e.totals || {};
    if (typeof totals.total === 'string') app.total = totals.total;
    setBalances(totals);
    let newLevel = false;
    for (const [key, value] of Object.entries(totals)) {
      const m = /^level_(\d+)$/.exec(key);
      if (!m) continue;
      if (!app.levels.includes(m[1])) { app.levels.push(m[1]); newLevel = true; }
      app.levelTotals[m[1]] = value;
    }
    if (newLevel) {
      app.levels.sort((a, b) => Number(a) - Number(b));
      renderCounters();
    }
    if (kind === 'commission') app.count += 1;
    updateCounters(true);

    if (e.source_user_id && !app.people.has(e.source_user_id) && !app.names.has(e.source_user_id)
        && !app.lookedUp.has(e.source_user_id)) {
      app.lookedUp.add(e.source_user_id);
      refreshReferrals();
    }
    updateDoughnut();
    // Commissions and reversals change the legs; the report has them once the event is out.
    if (kind === 'commission' || kind === 'reversal') scheduleReportRefresh();

    const feed = $('feed');
    feed.prepend(feedItem(e, true));
    while (feed.children.length > FEED_MAX) feed.lastElementChild.remove();
    $('feed-empty').hidden = true;
  }

  app.render = { feedItem }; // for the browser test: how an entry of each kind is shown

  // ---------------------------------------------------------------- live: the notifier

  function wsUrl() {
    if (app.config.notifier_ws_url) return app.config.notifier_ws_url;
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${proto}//${location.hostname}:${app.config.notifier_port}/ws`;
  }

  function setConn(state, text) {
    app.connState = state;
    $('conn').dataset.state = state;
    $('conn-text').textContent = text;
    clearInterval(app.countdownTimer);
  }

  function closeSocket() {
    const ws = app.socket;
    app.socket = null; // its onclose sees it is no longer current and stays quiet
    if (ws) ws.close(1000, 'page closed the stream');
  }

  function connect(gen) {
    if (gen !== app.gen || !app.user) return;
    clearTimeout(app.retryTimer);
    closeSocket();
    setConn('connecting', 'connecting…');
    let ws;
    try {
      ws = new WebSocket(wsUrl());
    } catch (e) {
      setConn('error', `bad notifier URL: ${e.message}`);
      return;
    }
    app.socket = ws;
    let refused = false;
    const userId = app.user.id;
    const socketToken = app.token;
    ws.onopen = () => {
      ws.send(JSON.stringify({ type: 'subscribe', user_id: userId, token: socketToken, since: app.lastSeq }));
    };
    ws.onmessage = (m) => {
      if (ws !== app.socket || gen !== app.gen) return;
      let msg;
      try { msg = JSON.parse(m.data); } catch { return; }
      if (msg.type === 'subscribed') {
        app.backoff = BACKOFF_MIN;
        setConn('live', 'live');
      } else if (msg.type === 'earning') {
        onEarning(msg.earning);
      } else if (msg.type === 'error') {
        // A user session whose token was revoked, or expired without having been renewed, is
        // over; an expired token already renewed reconnects with the new one.
        if (app.role === 'user' && (msg.code === 'token_revoked'
            || (msg.code === 'token_expired' && socketToken === app.token))) {
          sessionEnded(msg.code);
          return;
        }
        refused = msg.code === 'unauthorized' || msg.code === 'bad_request';
        setConn(refused ? 'error' : 'reconnecting', `${refused ? 'refused' : 'interrupted'}: ${msg.message}`);
      }
    };
    ws.onerror = () => {}; // a close event follows
    ws.onclose = () => {
      if (ws !== app.socket || gen !== app.gen) return;
      app.socket = null;
      if (refused) return; // a token the notifier refuses does not get better by retrying
      scheduleReconnect(gen);
    };
  }

  function scheduleReconnect(gen) {
    const delay = app.backoff;
    app.backoff = Math.min(app.backoff * 2, BACKOFF_MAX);
    const until = Date.now() + delay;
    const tick = () => {
      const s = Math.max(1, Math.ceil((until - Date.now()) / 1000));
      $('conn-text').textContent = `reconnecting in ${s} s`;
    };
    setConn('reconnecting', '');
    tick();
    app.countdownTimer = setInterval(tick, 250);
    app.retryTimer = setTimeout(() => connect(gen), delay);
  }

  // ---------------------------------------------------------------- simulate a purchase

  async function submitPurchase(ev) {
    ev.preventDefault();
    const out = $('purchase-result');
    const result = (ok, text) => {
      out.className = `form-result ${ok ? 'ok' : 'fail'}`;
      out.textContent = text;
      out.hidden = false;
    };
    const buyer = Number($('buyer').value);
    const amount = $('amount').value.trim();
    const key = app.role === 'admin' ? app.token : $('producer-key').value.trim();
    if (!buyer) return result(false, 'Pick a buyer among the referrals.');
    if (!key) {
      return result(false, 'Enter the producer key: purchases are accepted only from a producer '
        + 'or the admin, so that nobody can mint purchases that pay themselves.');
    }
    if (app.role !== 'admin') sessionStorage.setItem(KEY_PRODUCER, key);
    $('purchase-submit').disabled = true;
    const gen = app.gen;
    try {
      // The purchase id is the idempotency key (a retry with it never pays twice).
      // (getRandomValues, unlike randomUUID, works on plain-HTTP pages too.)
      const random = Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, '0')).join('');
      const purchaseId = `dash-${random}`;
      const r = await api('/api/purchases', { method: 'POST', token: key, body: { purchase_id: purchaseId, buyer_id: buyer, amount } });
      result(true, `Accepted as ${r.purchase_id}; waiting for the worker…`);
      trackPurchase(r.purchase_id, key, gen, result);
    } catch (e) {
      result(false, e.detail + (e.code ? ` (${e.code})` : ''));
    } finally {
      $('purchase-submit').disabled = false;
    }
    return undefined;
  }

  /** Polls the purchase's outcome for a few seconds and says what each level came to. */
  async function trackPurchase(id, key, gen, result) {
    const deadline = Date.now() + 15000;
    while (Date.now() < deadline && gen === app.gen) {
      // eslint-disable-next-line no-await-in-loop
      await new Promise((r) => { setTimeout(r, 400); });
      try {
        // eslint-disable-next-line no-await-in-loop
        const p = await api(`/api/purchases/${encodeURIComponent(id)}`, { token: key });
        if (gen !== app.gen) return;
        if (p.status !== 'processed') {
          result(false, `${id}: ${p.status}${p.reason ? ` — ${p.reason}` : ''}`);
          return;
        }
        const paid = p.levels.map((l) => (l.outcome === 'paid' || l.outcome === 'capped'
          ? `level ${l.level} paid ${formatMoney(l.amount)} to #${l.earner_id}`
          : `level ${l.level} ${l.outcome.replace(/_/g, ' ')}`));
        result(true, `${id} processed: ${paid.join('; ') || 'no levels'}.`);
        return;
      } catch (e) {
        if (e.status !== 404) return; // not processed yet, or nothing more to say
      }
    }
  }

  // ---------------------------------------------------------------- start

  async function boot() {
    $('signin-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const token = $('token').value.trim();
      if (token) signIn(token);
    });
    $('sign-out').addEventListener('click', signOut);
    $('user-filter').addEventListener('input', () => renderUserOptions());
    $('user-select').addEventListener('change', pickUser);
    $('user-show').addEventListener('click', () => {
      const id = Number($('user-select').value);
      if (id) openUser(id);
    });
    $('purchase-form').addEventListener('submit', submitPurchase);
    window.addEventListener('online', () => {
      if (app.user && !app.socket) { app.backoff = BACKOFF_MIN; connect(app.gen); }
    });

    try {
      const config = await api('/dashboard/config.json', { token: null });
      if (config) app.config = config;
    } catch { /* keep the defaults */ }

    const saved = sessionStorage.getItem(KEY_TOKEN);
    if (saved) await signIn(saved, { restoring: true });
    else showSignIn();
  }

  boot();
})();
