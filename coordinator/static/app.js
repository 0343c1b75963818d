// Shoal dashboard: keeps a live copy of the coordinator's /api/status and draws it.
//
// Connection: server-sent events on api/events (one status about every second). When the stream
// errors or goes quiet for more than a few seconds the page polls api/status every 2 s instead,
// and switches back as soon as events flow again. When neither answers, the banner says so and
// the page keeps showing the last state it received. URLs are relative, so the page also works
// behind a reverse proxy that mounts the coordinator under a path.
//
// Hooks for tests (keep them stable): #banner (hidden unless the coordinator is lost),
// body[data-conn] = connecting|live|polling|lost, #stage-map .stage[data-stage][data-state]
// [data-rebuild][data-view], .tile[data-peer-id][data-state][data-link], #join (hidden while a
// peer is live; data-emptiness = never|none-live), #join-command, #stage-map-wrap[data-overflow],
// #peer-rows tr[data-peer-id][data-stage][data-state] (td.c-link, td.c-mem only when a peer
// reports them; a table of more than 300 rows has only those in view, between tr.spacer rows),
// #stage-map .tile-more[data-more] (a stage with more peers than tiles), #timeline
// li[data-kind][data-peer-id], #bytes-by-mode li[data-mode], and window.__shoal = {status, conn,
// renders, lastRenderMs, firstRenderAt (ms after navigation), unchanged (documents received
// identical to the one drawn, so not drawn again)}.
//
// Files: app.js (this: connection, drawing order), views.js (summary, stage map), timeline.js,
// join.js (waiting for peers), scroll.js (sideways scrolling that shows), peers.js (peer table,
// detail drawer), charts.js (uPlot charts, bytes by sync mode), util.js.
// Plain ES modules, no build step; the only library is uPlot, vendored in vendor/uplot.

import { Charts, renderBytesByMode } from "./charts.js";
import { renderJoin } from "./join.js";
import { renderPeerDetail, renderPeerTable, revealPeer, setupPeerTable } from "./peers.js";
import { fmtClock, fmtDuration, Rates, setData, setText, unknown } from "./util.js";
import { renderTimeline } from "./timeline.js";
import { renderStageMap, renderSummary } from "./views.js";

const POLL_MS = 2000; // polling period while events are not flowing
const SSE_QUIET_MS = 3500; // events come about every second: this long without one means trouble
const LOST_MS = 6000; // no successful update for this long: the coordinator is lost
const FETCH_TIMEOUT_MS = 4000;

const $ = (id) => document.getElementById(id);
const shoal = (window.__shoal = {
  status: null,
  conn: "connecting",
  renders: 0,
  lastRenderMs: 0,
  firstRenderAt: null,
  unchanged: 0,
});
const rates = new Rates();
let charts = null;
let selected = null;

// ---------------------------------------------------------------------------------------------
// Drawing

function select(peerId) {
  selected = peerId || null;
  if (shoal.status) draw(shoal.status, false);
  if (selected) revealPeer(selected);
}

function draw(status, fresh = true) {
  const t0 = performance.now();
  if (fresh) rates.update(status.peers ?? [], status.now);
  renderSummary(status, rates);
  renderJoin(status);
  renderStageMap(status, rates, select, selected);
  renderPeerTable(status, rates, selected);
  renderPeerDetail(status, rates, selected);
  renderTimeline(status, select);
  charts.update(status.history);
  renderBytesByMode($("bytes-by-mode"), status.bytes_per_step_by_mode, status.run?.sync_mode);
  updateTitle();
  shoal.lastRenderMs = performance.now() - t0;
  shoal.renders += 1;
  if (shoal.renders === 1) shoal.firstRenderAt = performance.now(); // ms since navigation
  document.body.dataset.renders = String(shoal.renders);
}

/** "run · step N · Shoal", with a warning sign while the coordinator is lost. */
function updateTitle() {
  const run = shoal.status?.run?.name ?? "Shoal";
  const step = shoal.status?.totals?.step;
  const stepText = unknown(step) ? "" : ` · step ${step}`;
  const title = `${shoal.conn === "lost" ? "⚠ " : ""}${run}${stepText} · Shoal`;
  if (document.title !== title) document.title = title;
}

/** A status document as received (JSON text): drawn unless it is the one drawn last. */
function onStatusText(text, via) {
  if (text === conn.lastText && shoal.status) {
    // nothing changed (a quiet swarm, or the same document again): no parse, no redraw
    conn.lastOk = Date.now();
    conn.lastReceived = Date.now();
    shoal.unchanged += 1;
    setConn(via);
    return;
  }
  onStatus(JSON.parse(text), via);
  conn.lastText = text;
}

function onStatus(status, via) {
  if (!status || typeof status !== "object") throw new Error("not a status document");
  conn.lastOk = Date.now();
  conn.lastReceived = Date.now();
  shoal.status = status;
  setConn(via);
  draw(status);
}

// ---------------------------------------------------------------------------------------------
// Connection

const conn = {
  es: null,
  lastSse: 0,
  lastOk: 0,
  lastPoll: 0,
  polling: false,
  lostSince: null,
  lastReceived: 0,
  lastText: null, // the JSON text of the document drawn last
};

function setConn(state) {
  if (state === "lost" && conn.lostSince === null) conn.lostSince = Date.now();
  if (state !== "lost") conn.lostSince = null;
  shoal.conn = state;
  setData(document.body, "conn", state);
  setData($("conn"), "conn", state);
  setText(
    $("conn-text"),
    { live: "live", polling: "live (polling)", lost: "disconnected", connecting: "connecting…" }[
      state
    ],
  );
  updateBanner();
  updateTitle();
}

function updateBanner() {
  const banner = $("banner");
  const lost = shoal.conn === "lost";
  if (banner.hidden === lost) banner.hidden = !lost;
  if (!lost) return;
  const since = conn.lostSince ? fmtDuration((Date.now() - conn.lostSince) / 1000) : "";
  const silent = fmtDuration((Date.now() - conn.lastReceived) / 1000);
  setText(
    $("banner-title"),
    conn.lastReceived ? "Lost contact with the coordinator" : "Cannot reach the coordinator",
  );
  setText(
    $("banner-detail"),
    conn.lastReceived
      ? `No answer for ${silent}; retrying every ${POLL_MS / 1000} s. ` +
          `What you see is the last state received, at ${fmtClock(conn.lastReceived / 1000)}.`
      : `Retrying every ${POLL_MS / 1000} s${since ? ` (for ${since})` : ""}. ` +
          "Is `shoal coordinator` running?",
  );
}

function startEvents() {
  if (!("EventSource" in window)) return;
  const es = new EventSource("api/events");
  conn.es = es;
  const onData = (ev) => {
    try {
      conn.lastSse = Date.now();
      onStatusText(ev.data, "live");
    } catch (err) {
      console.warn("shoal: bad event from api/events", err);
    }
  };
  es.onmessage = onData;
  es.addEventListener("status", onData);
  es.onerror = () => {
    conn.lastSse = 0;
    if (es.readyState === EventSource.CLOSED) {
      // the browser gave up: open a new stream later
      conn.es = null;
      setTimeout(startEvents, POLL_MS);
    }
    poll(); // find out now whether the coordinator is gone or only the stream
  };
}

async function poll() {
  if (conn.polling) return;
  conn.polling = true;
  conn.lastPoll = Date.now();
  const ctl = new AbortController();
  const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
  try {
    const resp = await fetch("api/status", { cache: "no-store", signal: ctl.signal });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const text = await resp.text();
    onStatusText(text, Date.now() - conn.lastSse < SSE_QUIET_MS ? "live" : "polling");
  } catch (err) {
    setConn("lost");
  } finally {
    clearTimeout(timer);
    conn.polling = false;
  }
}

function tick() {
  const now = Date.now();
  const eventsFlowing = now - conn.lastSse < SSE_QUIET_MS;
  if (!eventsFlowing && now - conn.lastPoll >= POLL_MS) poll();
  if (conn.lastOk && now - conn.lastOk > LOST_MS && shoal.conn !== "lost") setConn("lost");
  if (shoal.conn === "lost") updateBanner();
  if (conn.lastReceived) {
    const ago = Math.round((now - conn.lastReceived) / 1000);
    setText($("updated"), ago <= 1 ? "updated just now" : `updated ${fmtDuration(ago)} ago`);
  }
}

// ---------------------------------------------------------------------------------------------
// Start

function main() {
  charts = new Charts();
  setupPeerTable(select);
  $("detail-close").addEventListener("click", () => select(null));
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape" && selected) select(null);
  });
  setConn("connecting");
  startEvents();
  poll(); // the first picture comes from whichever answers first
  setInterval(tick, 500);
}

main();
