// fleetpulse dashboard: one page, no dependencies, served by the dashboard server.
//
// Data: a snapshot (GET /v1/robots pages, /v1/fleet/summary, /v1/alerts) and one live
// feed (GET /v1/dashboard/feed, server-sent events read with fetch so the read token can
// go in the Authorization header; EventSource cannot send one). The feed resumes with
// Last-Event-ID after a drop; a `reset` event (changes after our id are gone) reloads
// the snapshot. Drawing: one canvas, markers batched by colour, redrawn at most every
// REDRAW_MS while data changes and at once on interaction.
"use strict";

const STATUS_COLOURS = {
  idle: "#8a94a6", moving: "#2f80ed", working: "#27ae60",
  charging: "#b07cf0", error: "#f2994a", estop: "#ff3b3b",
};
const STATUSES = Object.keys(STATUS_COLOURS);
const LIT_KEYS = Object.fromEntries(STATUSES.map((s) => [s, `${STATUS_COLOURS[s]}|0`]));
const DIM_KEYS = Object.fromEntries(STATUSES.map((s) => [s, `${STATUS_COLOURS[s]}|1`]));
const ALERT_COLOURS = {
  low_battery: "#f2c94c", battery_ok: "#27ae60", error: "#f2994a", estop: "#ff3b3b",
  offline: "#7d8896", back_online: "#2f80ed", stuck: "#b07cf0", order_reset: "#56ccf2",
};
const SERVICE_COLOURS = ["#4aa3ff", "#27ae60", "#f2994a", "#b07cf0", "#f2c94c", "#56ccf2"];
const REDRAW_MS = 250;      // data-driven redraws at most this often
const MAX_ALERTS = 200;     // kept in the feed
const PAGE = 1000;          // robots per snapshot request (the API's most)
const TOKEN_KEY = "fleetpulse.read-token";

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
};
const fmt = (n, d = 1) => (n == null || !isFinite(n) ? "—" : Number(n).toFixed(d));
const fmtMs = (s) => (s == null ? "—" : s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`);
const fmtUs = (us) => (us < 1000 ? `${us} µs` : us < 1e6 ? `${(us / 1000).toFixed(2)} ms` : `${(us / 1e6).toFixed(2)} s`);
const clock = (t) => new Date(t).toLocaleTimeString([], { hour12: false });
const ago = (ms) => {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  return s < 60 ? `${s.toFixed(0)} s ago` : s < 3600 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
};

// --- state --------------------------------------------------------------------------------
const app = {
  token: sessionStorage.getItem(TOKEN_KEY),
  config: null,
  robots: new Map(),      // id -> robot (flat view of a LiveState)
  gone: new Map(),        // id -> when it was retired (s, arrival clock): older states stay out
  sites: new Map(),       // site ("" for none) -> bounds {minX, maxX, minY, maxY}
  site: "",               // the site shown; "" all
  search: "",
  selected: null,         // robot id
  trail: [],              // [x, y] of the selected robot's recent reports, oldest first
  alerts: [],             // newest first
  summary: null,
  pipeline: null,
  rates: [],              // recent [accepted/s, applied/s] for the sparkline
  lastEventId: null,
  feedAbort: null,
  view: { k: 1, tx: 0, ty: 0 },
  dirty: true,
  lastDraw: 0,
  drawTimes: [],          // ms per map draw, newest last (read by tests)
  events: 0,              // feed events applied
  snapshots: 0,           // snapshots begun (1, and one more per reset)
  loaded: 0,              // snapshots completed
  resets: 0,              // reset events: changes after our id were gone
  connects: 0,            // feed connections opened
  marks: {},              // "robot:status" -> {since, drawn}: a transition and when drawn (tests)
  pendingMarks: new Map(),
  alertSeen: {},          // alert id -> epoch ms when it entered the feed (tests)
  layout: null,           // per draw: screen positions for picking
};
window.fleetpulse = {
  // For tests and the curious: read-only views of what the page holds and drew.
  stats: () => ({
    robots: app.robots.size, events: app.events, alerts: app.alerts.length, sites: [...app.sites.keys()],
    drawTimes: app.drawTimes.slice(), lastEventId: app.lastEventId,
    connected: $("conn").classList.contains("on"), trail: app.trail.length,
    snapshots: app.snapshots, loaded: app.loaded, resets: app.resets, connects: app.connects,
  }),
  ids: () => [...app.robots.keys()],
  alerts: () => app.alerts.slice(0, 100).map((a) => ({ ...a })),
  robot: (id) => app.robots.get(id) || null,
  markerAt: (id) => markerScreen(id),
  colourOf: (robot) => markerColour(robot),
  marks: () => ({ ...app.marks }),
  alertSeen: () => ({ ...app.alertSeen }),
  select: (id) => select(id),
};

// --- HTTP ---------------------------------------------------------------------------------
class Unauthorised extends Error {}

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${app.token}` } });
  if (r.status === 401 || r.status === 403) throw new Unauthorised(`${r.status}`);
  if (!r.ok) {
    let detail = `${r.status}`;
    try { detail = (await r.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(detail);
  }
  return r.json();
}

function askToken(message) {
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  app.token = $("token").value.trim();
  try {
    app.config = await api("/v1/dashboard/config");
  } catch (e) {
    askToken(e instanceof Unauthorised ? "that token is not a read token of this fleetpulse" : `${e.message}`);
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, app.token);
  $("token").value = "";
  $("login").hidden = true;
  start();
});

// --- robots -------------------------------------------------------------------------------
function robotOf(s) {
  const r = s.report;
  return {
    id: r.robot_id, status: r.status, battery: r.battery, x: r.pose.x, y: r.pose.y,
    theta: r.pose.theta, speed: r.speed, errors: r.errors || [], site: r.site || "",
    boot: r.boot, seq: r.seq, ts: Date.parse(r.ts), online: s.online,
    lastSeen: s.last_seen * 1000, statusSince: Date.parse(s.status_since),
    resets: s.resets || 0, updated: s.updated || 0, stale: s.stale || 0,
  };
}

// A robot's changes are ordered by (resets, boot, seq, updated): an older one (the
// snapshot and the feed overlap) is dropped, so any mix of the two ends the same.
function newer(a, b) {
  if (a.resets !== b.resets) return a.resets > b.resets;
  if (a.boot !== b.boot) return a.boot > b.boot;
  if (a.seq !== b.seq) return a.seq > b.seq;
  return a.updated >= b.updated;
}

function applyState(s) {
  const next = robotOf(s);
  const cur = app.robots.get(next.id);
  if (cur && !newer(next, cur)) return;
  if (app.gone.has(next.id) && next.updated <= app.gone.get(next.id)) return;
  app.robots.set(next.id, next);
  grow(next);
  if (!cur) addSite(next.site);
  if (!cur || cur.status !== next.status || cur.online !== next.online) {
    app.pendingMarks.set(`${next.id}:${next.online ? next.status : "offline"}`, next.statusSince);
  }
  if (next.id === app.selected) {
    if (!cur || cur.x !== next.x || cur.y !== next.y) app.trail.push([next.x, next.y]);
    if (app.trail.length > 200) app.trail.shift();
    scheduleDetail();
  }
  app.dirty = true;
}

// A retired robot leaves the map and the counts; a state of it from before stays out.
function retire(id, at) {
  app.gone.set(id, at);
  if (!app.robots.delete(id)) return;
  if (id === app.selected) closeDetail();
  app.dirty = true;
}

function grow(r) {
  const b = app.sites.get(r.site);
  if (!b) { app.sites.set(r.site, { minX: r.x, maxX: r.x, minY: r.y, maxY: r.y }); return; }
  if (r.x < b.minX) b.minX = r.x; if (r.x > b.maxX) b.maxX = r.x;
  if (r.y < b.minY) b.minY = r.y; if (r.y > b.maxY) b.maxY = r.y;
}

function addSite(site) {
  const select = $("site");
  if ([...select.options].some((o) => o.value === site && o.dataset.site != null)) return;
  const option = el("option", { value: site }, site || "(no site)");
  option.dataset.site = site;
  const after = [...select.options].find((o) => o.dataset.site != null && o.value > site);
  select.insertBefore(option, after || null);
}

async function loadSnapshot() {
  app.snapshots += 1;
  const fresh = new Map();
  let cursor = null;
  do {
    const q = new URLSearchParams({ limit: String(PAGE) });
    if (cursor) q.set("cursor", cursor);
    const page = await api(`/v1/robots?${q}`);
    for (const s of page.items) fresh.set(s.report.robot_id, s);
    cursor = page.next_cursor;
  } while (cursor);
  // Keep what the feed brought meanwhile if it is newer.
  for (const s of fresh.values()) applyState(s);
  const [summary, alerts] = await Promise.all([
    api("/v1/fleet/summary"), api("/v1/alerts?limit=100"),
  ]);
  app.summary = summary;
  const seen = new Set(app.alerts.map((a) => a.id));
  app.alerts = [...app.alerts, ...alerts.items.filter((a) => !seen.has(a.id))]
    .sort((a, b) => Date.parse(b.at) - Date.parse(a.at)).slice(0, MAX_ALERTS);
  renderFleetBar();
  renderAlerts();
  app.dirty = true;
  app.loaded += 1;
}

// A snapshot that fails (the server restarting, Redis away) is tried again until it loads.
async function reloadSnapshot() {
  let delay = 1000;
  for (;;) {
    try {
      await loadSnapshot();
      return;
    } catch (e) {
      if (e instanceof Unauthorised) { reportProblem(e); return; }
      $("conn").textContent = "reloading";
      await new Promise((ok) => setTimeout(ok, delay));
      delay = Math.min(delay * 2, 10000);
    }
  }
}

// --- the feed -----------------------------------------------------------------------------
function setConnected(on, text) {
  const c = $("conn");
  c.classList.toggle("on", on);
  c.classList.toggle("off", !on);
  c.textContent = text;
}

async function runFeed() {
  let delay = 1000;
  for (;;) {
    const abort = new AbortController();
    app.feedAbort = abort;
    const headers = { Authorization: `Bearer ${app.token}` };
    if (app.lastEventId) headers["Last-Event-ID"] = app.lastEventId;
    try {
      const r = await fetch("/v1/dashboard/feed", { headers, signal: abort.signal, cache: "no-store" });
      if (r.status === 401 || r.status === 403) { setConnected(false, "token refused"); askToken("the token was refused; enter a read token"); return; }
      if (!r.ok) throw new Error(`feed answered ${r.status}`);
      setConnected(true, "live");
      app.connects += 1;
      delay = 1000;
      await readEvents(r.body);
      setConnected(false, "reconnecting");
    } catch (e) {
      if (abort.signal.aborted) return;
      setConnected(false, "reconnecting");
    }
    await new Promise((ok) => setTimeout(ok, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

// Give the browser a turn (input, drawing) between slices of a large read.
const yieldToPage = () => (globalThis.scheduler && scheduler.yield ? scheduler.yield() : new Promise((ok) => setTimeout(ok, 0)));
const SLICE_MS = 8;

async function readEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end, start = 0, slice = performance.now();
    while ((end = buffer.indexOf("\n\n", start)) >= 0) {
      const block = buffer.slice(start, end);
      start = end + 2;
      if (performance.now() - slice > SLICE_MS) {
        await yieldToPage();
        slice = performance.now();
      }
      let id = null, event = "message", data = "";
      for (let at = 0; at < block.length;) {
        let nl = block.indexOf("\n", at);
        if (nl < 0) nl = block.length;
        if (block.charCodeAt(at) !== 58) {  // ":" starts a comment
          const colon = block.indexOf(":", at);
          const cut = colon < 0 || colon > nl ? nl : colon;
          const field = block.slice(at, cut);
          const v = cut === nl ? "" : block.slice(cut + (block.charCodeAt(cut + 1) === 32 ? 2 : 1), nl);
          if (field === "data") data = data ? `${data}\n${v}` : v;
          else if (field === "id") id = v;
          else if (field === "event") event = v;
        }
        at = nl + 1;
      }
      if (id != null) app.lastEventId = id;
      if (data) onEvent(event, data);
    }
    buffer = buffer.slice(start);
  }
}

function onEvent(event, data) {
  const body = JSON.parse(data);
  app.events += 1;
  if (event === "state") applyState(body.state);
  else if (event === "alert") addAlert(body.alert);
  else if (event === "retired") retire(body.robot_id, Date.parse(body.at) / 1000);
  else if (event === "summary") { app.summary = body; scheduleBar(); }
  else if (event === "pipeline") renderPipeline(body);
  else if (event === "reset") {
    // Changes after our id are gone: start again from a snapshot, then the feed goes on.
    app.lastEventId = body.resume;
    app.resets += 1;
    reloadSnapshot();
  }
}

// --- fleet bar ----------------------------------------------------------------------------
let barQueued = false;
function scheduleBar() {
  if (barQueued) return;
  barQueued = true;
  requestAnimationFrame(() => { barQueued = false; renderFleetBar(); });
}

function renderFleetBar() {
  const s = app.summary;
  const bar = $("fleet-bar");
  if (!s) return;
  const site = app.site;
  const counts = site !== "" && s.by_site_status[site] ? s.by_site_status[site] : s.by_status;
  const chips = [
    el("span", { class: "chip", title: "robots" }, "robots ", el("b", {}, String(site !== "" ? (s.by_site[site] || 0) : s.total))),
    el("span", { class: "chip", title: "online / offline (whole fleet)" }, "online ", el("b", {}, String(s.online)), " · offline ", el("b", {}, String(s.offline))),
    el("span", { class: "chip", title: "battery at or below the low threshold (whole fleet)" }, "low battery ", el("b", {}, String(s.low_battery))),
  ];
  for (const st of STATUSES) {
    chips.push(el("span", { class: "chip", "data-status": st, title: st },
      el("i", { style: `background:${STATUS_COLOURS[st]}` }), el("b", {}, String(counts[st] || 0))));
  }
  bar.replaceChildren(...chips);
  // Robots per site go into the site selector.
  for (const option of $("site").options) {
    if (option.dataset.site == null) continue;
    const n = option.value === "" ? s.total - Object.values(s.by_site).reduce((a, b) => a + b, 0) : s.by_site[option.value] || 0;
    option.textContent = `${option.value || "(no site)"} · ${n}`;
  }
}

// --- alerts -------------------------------------------------------------------------------
function addAlert(a) {
  if (app.alerts.some((x) => x.id === a.id)) return;
  app.alerts.unshift(a);
  app.alertSeen[a.id] = Date.now();
  if (app.alerts.length > MAX_ALERTS) app.alerts.length = MAX_ALERTS;
  renderAlerts(a.id);
  if (a.robot_id === app.selected) scheduleDetail();
}

function alertItem(a, fresh) {
  return el("li", { class: fresh ? "fresh" : "", "data-robot": a.robot_id, "data-kind": a.kind },
    el("span", { class: "muted" }, clock(Date.parse(a.at))),
    el("span", { class: "kind", style: `background:${ALERT_COLOURS[a.kind] || "#555"}33;color:${ALERT_COLOURS[a.kind] || "#ccc"}` }, a.kind),
    el("span", {}, el("span", { class: "robot-link", onclick: () => select(a.robot_id) }, a.robot_id), a.detail ? ` ${a.detail}` : ""));
}

function renderAlerts(freshId) {
  const site = app.site;
  const shown = app.alerts.filter((a) => site === "" || (app.robots.get(a.robot_id) || {}).site === site);
  $("alerts-feed").replaceChildren(...shown.slice(0, 100).map((a) => alertItem(a, a.id === freshId)));
  $("alerts-count").textContent = `${shown.length}${shown.length >= MAX_ALERTS ? "+" : ""}`;
}

// --- pipeline -----------------------------------------------------------------------------
function figure(value, label, title) {
  return el("div", { class: "fig", title: title || label }, el("div", { class: "v" }, value), el("div", { class: "l" }, label));
}

function renderPipeline(p) {
  app.pipeline = p;
  app.rates.push([p.accepted_per_s || 0, p.applied_per_s || 0]);
  if (app.rates.length > 90) app.rates.shift();
  const lagMax = Math.max(1, ...Object.values(p.lag));
  const deadTotal = Object.values(p.dead_letters).reduce((a, b) => a + b, 0);
  const body = [
    el("div", { class: "figures" },
      figure(fmt(p.accepted_per_s), "accepted /s", "reports made durable in Kafka per second (ingest)"),
      figure(fmt(p.applied_per_s), "applied /s", "reports applied to live state per second (dataflow)"),
      figure(fmt(p.dead_letters_per_s, 2), "dead letters /s"),
      figure(fmtMs(p.freshness_p50_s), "freshness p50", "Kafka append -> state in Redis, median over the window"),
      figure(fmtMs(p.freshness_p99_s), "freshness p99"),
      figure(String(Object.values(p.lag).reduce((a, b) => a + b, 0)), "lag (messages)", "reports in Kafka not yet read by the dataflow")),
    sparkline(app.rates.map((r) => r[0]), app.rates.map((r) => r[1]), "accepted", "applied"),
    el("div", { class: "bars" }, el("div", { class: "muted" }, "consumer lag by partition"),
      ...Object.entries(p.lag).map(([part, n]) => el("div", { class: "bar", "data-partition": part },
        el("span", {}, `partition ${part}`),
        el("span", { class: "track" }, el("span", { class: "fill", style: `display:block;width:${(100 * n / lagMax).toFixed(1)}%` })),
        el("span", {}, String(n))))),
    el("div", { class: "bars" }, el("div", { class: "muted" }, `dead letters by kind (total ${deadTotal})`),
      ...Object.entries(p.dead_letters).map(([kind, n]) => el("div", { class: "bar", "data-kind": kind },
        el("span", {}, kind),
        el("span", { class: "track" }, el("span", { class: "fill", style: `display:block;background:#eb5757;width:${(100 * n / Math.max(1, deadTotal)).toFixed(1)}%` })),
        el("span", {}, String(n))))),
    el("div", { class: "targets" }, `read every ${app.config ? app.config.tick_s : "?"} s over ${fmt(p.window_s, 0)} s from `,
      ...p.targets.map((t) => el("span", { class: t.up ? "" : "down", title: t.error || t.url }, `${t.role}${t.up ? "" : " (down)"} `))),
  ];
  $("pipeline-body").replaceChildren(...body);
}

function sparkline(a, b, la, lb) {
  const w = 360, h = 40;
  const max = Math.max(1, ...a, ...b);
  const pts = (xs) => xs.map((v, i) => `${(i / Math.max(1, xs.length - 1)) * w},${h - (v / max) * (h - 4) - 2}`).join(" ");
  const svg = svgEl("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" },
    svgEl("polyline", { points: pts(a), fill: "none", stroke: "#4aa3ff", "stroke-width": 1.5 }),
    svgEl("polyline", { points: pts(b), fill: "none", stroke: "#27ae60", "stroke-width": 1.5, "stroke-dasharray": "3 2" }));
  return el("div", { class: "chart" }, el("div", { class: "t" }, el("span", {}, `${la} (blue) / ${lb} (green) per s`), el("span", {}, `max ${fmt(max, 0)}`)), svg);
}

function svgEl(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const c of children) node.append(c);
  return node;
}

// --- the map ------------------------------------------------------------------------------
const canvas = $("map");
const ctx = canvas.getContext("2d", { alpha: false });

function markerColour(r) {
  return STATUS_COLOURS[r.status] || "#ffffff";
}

function batteryColour(b) {
  const low = app.config ? app.config.low_battery_pct : 20;
  return b <= low ? "#eb5757" : b <= 50 ? "#f2c94c" : "#6fdc8c";
}

function visibleSites() {
  const all = [...app.sites.keys()].sort();
  return app.site === "" ? all : all.filter((s) => s === app.site);
}

// Tiles: one per site shown, in a grid; each maps its site's bounds into its rectangle.
function tiles(width, height) {
  const sites = visibleSites();
  const n = Math.max(1, sites.length);
  const cols = Math.ceil(Math.sqrt(n * width / Math.max(1, height)));
  const rows = Math.ceil(n / cols);
  const tw = width / cols, th = height / rows;
  const out = new Map();
  sites.forEach((site, i) => {
    const b = app.sites.get(site);
    const pad = 24;
    const spanX = Math.max(1, b.maxX - b.minX), spanY = Math.max(1, b.maxY - b.minY);
    const scale = Math.min((tw - 2 * pad) / spanX, (th - 2 * pad - 14) / spanY);
    const x0 = (i % cols) * tw, y0 = Math.floor(i / cols) * th;
    const ox = x0 + (tw - spanX * scale) / 2, oy = y0 + 14 + (th - 14 - spanY * scale) / 2;
    // y grows upwards on a site plan
    out.set(site, { x0, y0, tw, th, scale, px: (x) => ox + (x - b.minX) * scale, py: (y) => oy + (b.maxY - y) * scale });
  });
  return out;
}

function toScreen(v, x, y) {
  return [x * v.k + v.tx, y * v.k + v.ty];
}

function draw() {
  const t0 = performance.now();
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  }
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#0f1419";
  ctx.fillRect(0, 0, w, h);
  const layout = tiles(w, h);
  const v = app.view;
  // Tile frames and names.
  ctx.strokeStyle = "#2a323c"; ctx.fillStyle = "#7d8896"; ctx.font = "11px system-ui"; ctx.lineWidth = 1;
  for (const [site, t] of layout) {
    const [x, y] = toScreen(v, t.x0 + 4, t.y0 + 4);
    ctx.strokeRect(x, y, (t.tw - 8) * v.k, (t.th - 8) * v.k);
    ctx.fillText(site || "(no site)", x + 6, y + 12);
  }
  // Markers, batched: one path per colour (and per online/offline).
  const shown = [];
  let count = 0;
  for (const r of app.robots.values()) if (layout.has(r.site)) count++;
  const perTile = count / Math.max(1, layout.size);
  const first = layout.values().next().value;
  const area = first ? first.tw * first.th : w * h;
  const radius = Math.max(2.2, Math.min(8, 0.32 * Math.sqrt(area / Math.max(1, perTile)))) * Math.min(3, Math.sqrt(v.k));
  const groups = new Map();
  const rings = new Map();
  const search = app.search;
  // Nothing is allocated per robot here but the entries of these arrays: a draw of
  // 10,000 robots several times a second must not feed the garbage collector.
  for (const r of app.robots.values()) {
    const t = layout.get(r.site);
    if (!t) continue;
    const sx = t.px(r.x) * v.k + v.tx, sy = t.py(r.y) * v.k + v.ty;
    if (sx < -10 || sy < -10 || sx > w + 10 || sy > h + 10) continue;
    shown.push(r.id, sx, sy);
    const dim = !r.online || (search && !r.id.includes(search));
    const key = dim ? DIM_KEYS[r.status] || "#ffffff|1" : LIT_KEYS[r.status] || "#ffffff|0";
    let g = groups.get(key);
    if (!g) { g = []; groups.set(key, g); }
    g.push(sx, sy);
    if (radius >= 3 && !dim) {
      const rk = batteryColour(r.battery);
      let rg = rings.get(rk);
      if (!rg) { rg = []; rings.set(rk, rg); }
      rg.push(sx, sy, r.battery);
    }
  }
  for (const [key, pts] of groups) {
    const [colour, dim] = key.split("|");
    ctx.globalAlpha = dim === "1" ? 0.28 : 1;
    ctx.fillStyle = colour;
    ctx.beginPath();
    if (radius < 3) {  // a few pixels: a square reads the same and costs far less than an arc
      const d = 2 * radius;
      for (let i = 0; i < pts.length; i += 2) ctx.rect(pts[i] - radius, pts[i + 1] - radius, d, d);
    } else {
      for (let i = 0; i < pts.length; i += 2) { ctx.moveTo(pts[i] + radius, pts[i + 1]); ctx.arc(pts[i], pts[i + 1], radius, 0, 2 * Math.PI); }
    }
    ctx.fill();
  }
  ctx.globalAlpha = 1;
  ctx.lineWidth = Math.max(1, radius * 0.35);
  for (const [colour, pts] of rings) {
    ctx.strokeStyle = colour;
    ctx.beginPath();
    const rr = radius + ctx.lineWidth * 0.9;
    for (let i = 0; i < pts.length; i += 3) {
      const end = -Math.PI / 2 + (2 * Math.PI * pts[i + 2]) / 100;
      ctx.moveTo(pts[i] + rr * Math.cos(-Math.PI / 2), pts[i + 1] + rr * Math.sin(-Math.PI / 2));
      ctx.arc(pts[i], pts[i + 1], rr, -Math.PI / 2, end);
    }
    ctx.stroke();
  }
  // The selected robot: its trail, heading and a halo.
  const sel = app.selected && app.robots.get(app.selected);
  if (sel && layout.has(sel.site)) {
    const t = layout.get(sel.site);
    const pts = [...app.trail, [sel.x, sel.y]].map(([x, y]) => toScreen(v, t.px(x), t.py(y)));
    ctx.strokeStyle = "#ffffffaa"; ctx.lineWidth = 1.5; ctx.setLineDash([4, 3]);
    ctx.beginPath();
    pts.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.stroke(); ctx.setLineDash([]);
    const [sx, sy] = pts[pts.length - 1];
    ctx.strokeStyle = "#ffffff"; ctx.lineWidth = 2;
    ctx.beginPath(); ctx.arc(sx, sy, radius + 6, 0, 2 * Math.PI); ctx.stroke();
    ctx.beginPath(); ctx.moveTo(sx, sy); ctx.lineTo(sx + Math.cos(sel.theta) * (radius + 10), sy - Math.sin(sel.theta) * (radius + 10)); ctx.stroke();
  }
  app.layout = { shown, radius, layout };
  const took = performance.now() - t0;
  app.drawTimes.push(took);
  if (app.drawTimes.length > 600) app.drawTimes.shift();
  const drawn = performance.timeOrigin + performance.now();
  for (const [key, since] of app.pendingMarks) app.marks[key] = { since, drawn };
  app.pendingMarks.clear();
}

function markerScreen(id) {
  const L = app.layout;
  if (!L) return null;
  for (let i = 0; i < L.shown.length; i += 3) if (L.shown[i] === id) return { x: L.shown[i + 1], y: L.shown[i + 2], radius: L.radius };
  return null;
}

function pick(x, y) {
  const L = app.layout;
  if (!L) return null;
  let best = null, bestD = (L.radius + 5) ** 2;
  for (let i = 0; i < L.shown.length; i += 3) {
    const d = (L.shown[i + 1] - x) ** 2 + (L.shown[i + 2] - y) ** 2;
    if (d <= bestD) { bestD = d; best = L.shown[i]; }
  }
  return best;
}

function loop() {
  const now = performance.now();
  if (app.dirty && (app.interacting || now - app.lastDraw >= REDRAW_MS)) {
    app.dirty = false; app.interacting = false; app.lastDraw = now;
    draw();
  }
  requestAnimationFrame(loop);
}

function redrawNow() { app.dirty = true; app.interacting = true; }

// Zoom at the cursor, drag to pan, double-click to fit, click to pick.
canvas.addEventListener("wheel", (ev) => {
  ev.preventDefault();
  const v = app.view;
  const f = Math.exp(-ev.deltaY * 0.0015);
  const k = Math.min(40, Math.max(0.5, v.k * f));
  const rect = canvas.getBoundingClientRect();
  const mx = ev.clientX - rect.left, my = ev.clientY - rect.top;
  v.tx = mx - ((mx - v.tx) * k) / v.k; v.ty = my - ((my - v.ty) * k) / v.k; v.k = k;
  redrawNow();
}, { passive: false });
let drag = null;
canvas.addEventListener("mousedown", (ev) => { drag = { x: ev.clientX, y: ev.clientY, moved: false }; });
window.addEventListener("mousemove", (ev) => {
  if (!drag) return;
  const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
  if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
  if (drag.moved) { app.view.tx += dx; app.view.ty += dy; drag.x = ev.clientX; drag.y = ev.clientY; redrawNow(); }
});
window.addEventListener("mouseup", (ev) => {
  if (drag && !drag.moved && ev.target === canvas) {
    const rect = canvas.getBoundingClientRect();
    const id = pick(ev.clientX - rect.left, ev.clientY - rect.top);
    if (id) select(id);
  }
  drag = null;
});
canvas.addEventListener("dblclick", () => { app.view = { k: 1, tx: 0, ty: 0 }; redrawNow(); });
window.addEventListener("resize", redrawNow);

$("site").addEventListener("change", (ev) => {
  app.site = ev.target.value; app.view = { k: 1, tx: 0, ty: 0 };
  renderFleetBar(); renderAlerts(); redrawNow();
});
$("search").addEventListener("input", (ev) => { app.search = ev.target.value.trim(); redrawNow(); });
$("search").addEventListener("keydown", (ev) => {
  if (ev.key !== "Enter") return;
  const q = app.search;
  if (!q) return;
  const exact = app.robots.get(q);
  const hit = exact || [...app.robots.values()].find((r) => r.id.includes(q));
  if (hit) select(hit.id);
});

function legend() {
  $("map-legend").replaceChildren(...STATUSES.map((s) => el("span", { class: "chip" }, el("i", { style: `background:${STATUS_COLOURS[s]}` }), s)),
    el("span", { class: "chip" }, el("i", { style: "background:#8a94a6;opacity:.3" }), "offline (dimmed)"),
    el("span", { class: "chip" }, "ring: battery"));
}

// --- robot detail -------------------------------------------------------------------------
let detailTimer = null, detailLoaded = 0;
function scheduleDetail() {
  if (detailTimer) return;
  // The live part follows every change; history, stats and traces at most every 5 s.
  detailTimer = setTimeout(() => { detailTimer = null; renderDetail(Date.now() - detailLoaded > 5000); }, 300);
}

async function select(id) {
  if (!id) { closeDetail(); return; }
  app.selected = id;
  app.trail = [];
  $("detail").hidden = false;
  $("detail-id").textContent = id;
  $("detail-body").replaceChildren(el("p", { class: "muted" }, "loading…"));
  detailLoaded = 0;
  redrawNow();
  await renderDetail(true);
  findTraces(id);
}
function closeDetail() { app.selected = null; app.trail = []; $("detail").hidden = true; redrawNow(); }
$("detail-close").addEventListener("click", closeDetail);

app.detail = { history: [], stats: [], alerts: [] };
async function renderDetail(reload) {
  const id = app.selected;
  if (!id) return;
  if (reload) {
    detailLoaded = Date.now();
    try {
      const enc = encodeURIComponent(id);
      const [state, history, stats, alerts] = await Promise.all([
        api(`/v1/robots/${enc}`), api(`/v1/robots/${enc}/history?limit=100`),
        api(`/v1/robots/${enc}/stats?limit=30`), api(`/v1/alerts?robot_id=${enc}&limit=20`),
      ]);
      if (id !== app.selected) return;
      applyState(state);
      app.detail = { history: history.items, stats: stats.items.slice().reverse(), alerts: alerts.items };
      app.trail = history.items.slice().reverse().map((r) => [r.pose.x, r.pose.y]);
      redrawNow();
    } catch (e) {
      reportProblem(e);
      return;
    }
  }
  const r = app.robots.get(id);
  if (!r) return;
  const d = app.detail;
  const kv = (k, v) => [el("dt", {}, k), el("dd", {}, v)];
  const body = [
    el("dl", { class: "kv", id: "detail-state" },
      ...kv("status", el("span", { class: "chip", "data-status": r.status }, el("i", { style: `background:${markerColour(r)}` }), r.status)),
      ...kv("since", `${clock(r.statusSince)} (${ago(r.statusSince)})`),
      ...kv("online", r.online ? `yes, last report ${ago(r.lastSeen)}` : `no — silent since ${clock(r.lastSeen)}`),
      ...kv("battery", `${fmt(r.battery)} %`),
      ...kv("speed", `${fmt(r.speed, 2)} m/s`),
      ...kv("pose", `x ${fmt(r.x, 2)} · y ${fmt(r.y, 2)} · θ ${fmt(r.theta, 2)}`),
      ...kv("site", r.site || "(none)"),
      ...kv("report", `boot ${r.boot} · seq ${r.seq} · ${clock(r.ts)}`),
      ...(r.errors.length ? kv("errors", r.errors.join(", ")) : []),
      ...(r.stale ? kv("stale", `${r.stale} reports older than the newest`) : [])),
    el("div", { class: "muted" }, `1-minute windows (${d.stats.length})`),
    el("div", { class: "charts" },
      bandChart("battery min / avg / max %", d.stats, (s) => [s.battery_min, s.battery_avg, s.battery_max], 0, 100),
      barChart("distance per window (m)", d.stats.map((s) => s.distance_m)),
      lineChart("max speed (m/s)", d.stats.map((s) => s.max_speed))),
    el("div", { class: "muted" }, `alerts (${d.alerts.length})`),
    el("ul", { class: "mini", id: "detail-alerts" }, ...d.alerts.map((a) => el("li", { "data-kind": a.kind },
      el("span", { class: "kind", style: `color:${ALERT_COLOURS[a.kind] || "#ccc"}` }, a.kind), ` ${clock(Date.parse(a.at))} ${a.detail || ""}`))),
    el("div", { class: "muted" }, "latest traces: below, in the trace view"),
  ];
  $("detail-body").replaceChildren(...body);
}

function chartBox(title, last, svg) {
  return el("div", { class: "chart" }, el("div", { class: "t" }, el("span", {}, title), el("span", {}, last)), svg);
}

function scaleY(v, lo, hi, h) { return h - 3 - ((v - lo) / Math.max(1e-9, hi - lo)) * (h - 6); }

function bandChart(title, stats, f, lo, hi) {
  const w = 360, h = 46;
  if (!stats.length) return chartBox(title, "no closed window yet", svgEl("svg", { viewBox: `0 0 ${w} ${h}` }));
  const vals = stats.length === 1 ? [f(stats[0]), f(stats[0])] : stats.map(f);  // one window: a level band
  const n = vals.length, x = (i) => (i / (n - 1)) * w;
  const top = vals.map((v, i) => `${x(i)},${scaleY(v[2], lo, hi, h)}`);
  const bottom = vals.map((v, i) => `${x(i)},${scaleY(v[0], lo, hi, h)}`).reverse();
  return chartBox(title, `${fmt(vals[n - 1][1])}`, svgEl("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" },
    svgEl("polygon", { points: [...top, ...bottom].join(" "), fill: "#4aa3ff33", stroke: "none" }),
    svgEl("polyline", { points: vals.map((v, i) => `${x(i)},${scaleY(v[1], lo, hi, h)}`).join(" "), fill: "none", stroke: "#4aa3ff", "stroke-width": 1.5 })));
}

function barChart(title, values) {
  const w = 360, h = 46, n = values.length;
  const max = Math.max(1e-9, ...values);
  const bw = n ? w / n : w;
  return chartBox(title, n ? fmt(values[n - 1], 1) : "—", svgEl("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" },
    ...values.map((v, i) => svgEl("rect", { x: i * bw + 1, width: Math.max(1, bw - 2), y: scaleY(v, 0, max, h), height: h - 3 - scaleY(v, 0, max, h), fill: "#27ae60" }))));
}

function lineChart(title, values) {
  const w = 360, h = 46;
  if (values.length === 1) values = [values[0], values[0]];
  const n = values.length;
  const max = Math.max(1e-9, ...values);
  const x = (i) => (n <= 1 ? w / 2 : (i / (n - 1)) * w);
  return chartBox(title, n ? fmt(values[n - 1], 2) : "—", svgEl("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none" },
    svgEl("polyline", { points: values.map((v, i) => `${x(i)},${scaleY(v, 0, max, h)}`).join(" "), fill: "none", stroke: "#f2994a", "stroke-width": 1.5 })));
}

// --- traces -------------------------------------------------------------------------------
const TRACE_ID = /^[0-9a-fA-F]{16}$|^[0-9a-fA-F]{32}$/;

$("trace-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const q = $("trace-query").value.trim();
  if (!q) return;
  if (TRACE_ID.test(q) && !app.robots.has(q)) openTrace(q);
  else findTraces(q);
});

async function findTraces(robotId) {
  $("trace-query").value = robotId;
  $("trace-note").textContent = `searching Jaeger for ${robotId}…`;
  $("trace-list").replaceChildren();
  try {
    const found = await api(`/v1/traces?robot_id=${encodeURIComponent(robotId)}&limit=10`);
    const sampled = app.config ? ` (a ${(app.config.trace_sample_ratio * 100).toFixed(0)} % sample of reports is traced)` : "";
    $("trace-note").textContent = found.items.length ? `${found.items.length} traces of ${robotId}` : `no traces of ${robotId} in Jaeger yet${sampled}`;
    $("trace-list").replaceChildren(...found.items.map((t) => el("li", { "data-trace": t.trace_id, onclick: () => showTrace(t, found.jaeger_ui) },
      `${clock(t.started_us / 1000)} · ${t.spans.length} spans · ${fmtUs(t.duration_us)}`)));
    if (found.items.length) showTrace(found.items[0], found.jaeger_ui);
    else $("waterfall").replaceChildren(el("p", { class: "muted" }, `No trace of ${robotId} yet: reports are traced at the sample ratio (or when their traceparent is sampled); Jaeger keeps them in memory.`));
  } catch (e) {
    $("trace-note").textContent = e instanceof Unauthorised ? "token refused" : `traces: ${e.message}`;
  }
}

async function openTrace(id) {
  $("trace-note").textContent = `loading trace ${id}…`;
  try {
    const t = await api(`/v1/traces/${id}`);
    $("trace-note").textContent = `trace ${t.trace_id}`;
    $("trace-list").replaceChildren(el("li", { class: "on", "data-trace": t.trace_id }, `${clock(t.started_us / 1000)} · ${t.spans.length} spans`));
    showTrace(t, app.config && app.config.jaeger_ui);
  } catch (e) {
    $("trace-note").textContent = `trace ${id}: ${e.message}`;
  }
}

function showTrace(t, jaegerUi) {
  for (const li of $("trace-list").children) li.classList.toggle("on", li.dataset.trace === t.trace_id);
  const depth = new Map();
  for (const s of t.spans) depth.set(s.span_id, s.parent_id && depth.has(s.parent_id) ? depth.get(s.parent_id) + 1 : 0);
  const total = Math.max(1, t.duration_us);
  const colour = (svc) => SERVICE_COLOURS[t.services.indexOf(svc) % SERVICE_COLOURS.length];
  const rows = [];
  for (const s of t.spans) {
    const left = (100 * s.offset_us) / total, width = Math.max(0.3, (100 * s.duration_us) / total);
    const tags = el("tr", { hidden: "" }, el("td", { colspan: "3" }, el("div", { class: "tags" },
      ...Object.entries(s.tags).filter(([k]) => !k.startsWith("otel.scope") && k !== "span.kind" && k !== "internal.span.format")
        .map(([k, v]) => el("span", {}, `${k}=`, el("b", {}, String(v)), "  ")))));
    const row = el("tr", { class: s.error ? "error" : "", "data-span": s.name, "data-service": s.service, onclick: () => { tags.hidden = !tags.hidden; } },
      el("td", { class: "name", style: `padding-left:${4 + 14 * depth.get(s.span_id)}px`, title: `${s.service}: ${s.name}` },
        el("span", { style: `color:${colour(s.service)}` }, s.service.replace("fleetpulse-", "")), ` ${s.name}`),
      el("td", { class: "lane" }, el("span", { class: "span-bar", style: `left:${left}%;width:${width}%;background:${colour(s.service)}` })),
      el("td", { class: "muted when" }, `+${fmtUs(s.offset_us)} · ${fmtUs(s.duration_us)}`));
    rows.push(row, tags);
  }
  const head = el("div", { class: "muted" }, `trace ${t.trace_id} · ${t.services.join(" → ")} · ${fmtUs(t.duration_us)} · click a span for its attributes `,
    jaegerUi ? el("a", { href: `${jaegerUi}/trace/${t.trace_id}`, target: "_blank", rel: "noopener" }, "open in Jaeger") : null);
  $("waterfall").replaceChildren(head, el("table", { class: "wf", id: "waterfall-table" }, ...rows));
  // The first chain's attributes open by default: partition, offset, (boot, seq).
  rows.filter((_, i) => i % 2 === 1).forEach((r) => { r.hidden = false; });
}

// --- start --------------------------------------------------------------------------------
function reportProblem(e) {
  if (e instanceof Unauthorised) { askToken("the token was refused; enter a read token"); return; }
  console.warn("fleetpulse:", e.message || e);
}

let started = false;
async function start() {
  if (started) return;
  started = true;
  legend();
  requestAnimationFrame(loop);
  runFeed();  // first, so the snapshot and the feed overlap rather than leave a gap
  await reloadSnapshot();
}

(async () => {
  if (!app.token) { askToken(); return; }
  try {
    app.config = await api("/v1/dashboard/config");
  } catch (e) {
    sessionStorage.removeItem(TOKEN_KEY);
    askToken(e instanceof Unauthorised ? "the kept token was refused; enter a read token" : e.message);
    return;
  }
  start();
})();
