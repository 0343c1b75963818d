// Formatting and DOM helpers shared by the dashboard's views.
//
// Everything that comes from the coordinator (peer ids, devices, event details) was reported by
// peers over the network, so it is only ever written with textContent, never as HTML.

/** True for the ways /api/status says "unknown": null, missing, "", and stage -1. */
export function unknown(v) {
  return v === null || v === undefined || v === "" || (typeof v === "number" && !isFinite(v));
}

/** A peer that no longer holds a lease: the coordinator says live=false, or lost / left. */
export function departed(p) {
  return p.live === false || p.state === "lost" || p.state === "left";
}

/** A stage number, or null when the field says "none" (null, "", -1). */
export function stageOf(v) {
  return unknown(v) || v < 0 ? null : Number(v);
}

/** Seconds since the epoch from a number or an ISO string; null when unknown. */
export function toSeconds(v) {
  if (unknown(v)) return null;
  if (typeof v === "number") return v > 1e12 ? v / 1000 : v;
  const ms = Date.parse(v);
  return isNaN(ms) ? null : ms / 1000;
}

const DASH = "–";

/** 1234567 -> "1.2 MB" (SI units, as network rates are quoted). */
export function fmtBytes(n) {
  if (unknown(n)) return DASH;
  const units = ["B", "kB", "MB", "GB", "TB", "PB"];
  let v = Math.abs(n);
  let i = 0;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  const digits = i === 0 ? 0 : v < 10 ? 2 : v < 100 ? 1 : 0;
  return `${n < 0 ? "-" : ""}${v.toFixed(digits)} ${units[i]}`;
}

export function fmtRate(n) {
  return unknown(n) ? DASH : `${fmtBytes(n)}/s`;
}

/** A number with a sensible number of digits for a table cell. */
export function fmtNum(n, digits = 1) {
  if (unknown(n)) return DASH;
  const a = Math.abs(n);
  if (a >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (a >= 1e4) return `${(n / 1e3).toFixed(1)} k`;
  return Number(n).toFixed(digits);
}

// Intl formatters are costly to build: make each once (a 200-peer refresh formats thousands).
const INT = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
const CLOCK = new Intl.DateTimeFormat("en-GB", {
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
  hour12: false,
});
const DATETIME = new Intl.DateTimeFormat("en-GB", { dateStyle: "medium", timeStyle: "medium" });

export function fmtInt(n) {
  return unknown(n) ? DASH : INT.format(Math.round(n));
}

/** 3725 -> "1 h 02 m"; 65 -> "1 m 05 s". */
export function fmtDuration(s) {
  if (unknown(s)) return DASH;
  s = Math.max(0, Math.round(s));
  const d = Math.floor(s / 86400);
  const h = Math.floor((s % 86400) / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  const p2 = (x) => String(x).padStart(2, "0");
  if (d) return `${d} d ${p2(h)} h`;
  if (h) return `${h} h ${p2(m)} m`;
  if (m) return `${m} m ${p2(sec)} s`;
  return `${sec} s`;
}

/** Local wall-clock time HH:MM:SS of an epoch time. */
export function fmtClock(t) {
  const s = toSeconds(t);
  if (s === null) return DASH;
  return CLOCK.format(new Date(s * 1000));
}

/** Local date and time of an epoch time, for tooltips and the footer. */
export function fmtDateTime(t) {
  const s = toSeconds(t);
  return s === null ? DASH : DATETIME.format(new Date(s * 1000));
}

/** The first 8 characters of a peer id: enough to tell peers apart on screen. */
export function shortId(id) {
  return unknown(id) ? DASH : String(id).slice(0, 8);
}

/** Set a node's text only when it changed (keeps 200-row updates cheap). */
export function setText(node, text) {
  const s = String(text);
  if (node.textContent !== s) node.textContent = s;
}

/** Set or clear a data-* attribute only when it changed. */
export function setData(node, name, value) {
  const s = unknown(value) ? "" : String(value);
  if (node.dataset[name] !== s) node.dataset[name] = s;
}

/** document.createElement with a class name and optional text. */
export function el(tag, className = "", text = null) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== null) node.textContent = text;
  return node;
}

/**
 * Make parent's children match `items`, in order, reusing the node of each key.
 * Every child of parent must have been made by this function (it keys them by data-key).
 */
export function reconcile(parent, items, keyOf, create, update) {
  const existing = new Map();
  for (const child of parent.children) existing.set(child.dataset.key, child);
  const keep = new Set();
  let prev = null;
  for (const item of items) {
    const key = String(keyOf(item));
    let node = existing.get(key);
    if (!node) {
      node = create(item);
      node.dataset.key = key;
    }
    update(node, item);
    keep.add(key);
    const want = prev ? prev.nextSibling : parent.firstChild;
    if (node !== want) parent.insertBefore(node, want);
    prev = node;
  }
  for (const [key, node] of existing) if (!keep.has(key)) node.remove();
}

/**
 * Bandwidth per peer, derived from successive byte counters and the coordinator's clock.
 * A counter that goes backwards (the peer restarted) starts a new measurement.
 */
export class Rates {
  constructor(minInterval = 0.5) {
    this.minInterval = minInterval;
    this.last = new Map(); // peer id -> {t, sent, received}
    this.rate = new Map(); // peer id -> {up, down} in bytes/s
  }

  update(peers, now) {
    const t = toSeconds(now) ?? Date.now() / 1000;
    const seen = new Set();
    for (const p of peers) {
      const id = p.peer_id;
      seen.add(id);
      const prev = this.last.get(id);
      const cur = { t, sent: p.bytes_sent, received: p.bytes_received };
      if (unknown(cur.sent) || unknown(cur.received)) continue;
      if (!prev || cur.sent < prev.sent || cur.received < prev.received) {
        this.last.set(id, cur);
        this.rate.delete(id);
        continue;
      }
      const dt = t - prev.t;
      if (dt < this.minInterval) continue;
      this.rate.set(id, {
        up: (cur.sent - prev.sent) / dt,
        down: (cur.received - prev.received) / dt,
      });
      this.last.set(id, cur);
    }
    for (const id of [...this.last.keys()]) {
      if (!seen.has(id)) {
        this.last.delete(id);
        this.rate.delete(id);
      }
    }
  }

  get(id) {
    return this.rate.get(id) ?? { up: null, down: null };
  }
}
