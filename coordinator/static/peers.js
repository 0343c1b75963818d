// The peer table (sortable, filterable, grouped by stage) and the peer detail drawer.
//
// Rows are reused by peer id, and sorting and filtering always run over every peer. Up to
// FULL_ROWS rows are all in the DOM; beyond that (a swarm of thousands) only the rows in view, and
// OVERSCAN more on each side, are: spacer rows (tr.spacer) above and below stand in for the rest,
// so the scrollbar and the scroll position are those of the whole table, and scrolling draws the
// rows that come into view. The stage group of the first row in view is drawn too (it sticks).

import {
  departed,
  el,
  fmtBytes,
  fmtClock,
  fmtDuration,
  fmtNum,
  fmtRate,
  reconcile,
  setData,
  setText,
  shortId,
  stageOf,
  toSeconds,
  unknown,
} from "./util.js";
import { watchSideScroll } from "./scroll.js";
import { STATES } from "./views.js";

const $ = (id) => document.getElementById(id);
const STATE_RANK = Object.fromEntries(STATES.map((s, i) => [s, i]));

/** Device memory as "in use / total" (either may be missing); null when neither is reported. */
function fmtDeviceMemory(p) {
  const used = p.device_memory_bytes;
  const total = p.device_memory_total_bytes;
  if (unknown(used) && unknown(total)) return null;
  if (unknown(total)) return fmtBytes(used);
  return `${unknown(used) ? "–" : fmtBytes(used)} / ${fmtBytes(total)}`;
}

/** How the swarm reaches a peer: the coordinator's dial-back (`reach`: "direct", "relayed",
 * "unreachable"; "" until checked), or the older `link` key; null when unknown. */
function reachOf(p) {
  const r = unknown(p.reach) ? p.link : p.reach;
  return unknown(r) ? null : r;
}

// Columns shown only once some peer reports the field (nothing, not a row of dashes, before):
// `link` (the peer's reach: direct, relayed or unreachable) and device memory.
const OPTIONAL = [
  {
    key: "link",
    label: "Link",
    has: (p) => reachOf(p) !== null,
    sort: (p) => reachOf(p),
    text: (p) => reachOf(p) ?? "–",
  },
  {
    key: "mem",
    label: "Device mem",
    num: true,
    has: (p) => fmtDeviceMemory(p) !== null,
    sort: (p) => p.device_memory_bytes,
    text: (p) => fmtDeviceMemory(p) ?? "–",
  },
];

// Each column: header, sort value, cell text. `num` columns are right-aligned.
function columns(rates, now, peers) {
  const optional = OPTIONAL.filter((c) => peers.some(c.has));
  const lease = (p) => {
    const t = toSeconds(p.lease_expires);
    return t === null || departed(p) ? null : t - now;
  };
  // A departed peer sends nothing: its rate is unknown, not zero.
  const rate = (p) => (departed(p) ? { up: null, down: null } : rates.get(p.peer_id));
  return [
    { key: "peer", label: "Peer", sort: (p) => p.peer_id, text: (p) => shortId(p.peer_id) },
    {
      key: "stage",
      label: "Stage",
      num: true,
      sort: (p) => stageOf(p.stage),
      text: (p) => stageOf(p.stage) ?? "–",
    },
    {
      key: "state",
      label: "State",
      sort: (p) => STATE_RANK[p.state] ?? 99,
      text: (p) => p.state ?? "–",
    },
    {
      key: "sps",
      label: "Samples/s",
      num: true,
      sort: (p) => p.samples_per_s,
      text: (p) => fmtNum(p.samples_per_s),
    },
    { key: "queue", label: "Queue", num: true, sort: (p) => p.queue, text: (p) => p.queue ?? "–" },
    {
      key: "rx",
      label: "Received",
      num: true,
      sort: (p) => p.bytes_received,
      text: (p) => fmtBytes(p.bytes_received),
    },
    {
      key: "tx",
      label: "Sent",
      num: true,
      sort: (p) => p.bytes_sent,
      text: (p) => fmtBytes(p.bytes_sent),
    },
    {
      key: "down",
      label: "↓ rate",
      num: true,
      sort: (p) => rate(p).down,
      text: (p) => fmtRate(rate(p).down),
    },
    {
      key: "up",
      label: "↑ rate",
      num: true,
      sort: (p) => rate(p).up,
      text: (p) => fmtRate(rate(p).up),
    },
    {
      key: "loss",
      label: "Loss",
      num: true,
      sort: (p) => p.loss,
      text: (p) => (unknown(p.loss) ? "–" : Number(p.loss).toFixed(3)),
    },
    { key: "step", label: "Step", num: true, sort: (p) => p.step, text: (p) => p.step ?? "–" },
    { key: "device", label: "Device", sort: (p) => p.device, text: (p) => p.device ?? "–" },
    ...optional,
    {
      key: "lease",
      label: "Lease",
      num: true,
      sort: lease,
      text: (p) => (lease(p) === null ? "–" : `${Math.max(0, lease(p)).toFixed(0)} s`),
    },
  ];
}

/** Table state the user controls; survives every refresh. */
const view = { sortKey: "stage", sortDir: 1, group: true, filter: "", state: "" };
let lastArgs = null;
let tableScroll = () => {};
const ARROWS = { left: "←", right: "→", both: "← →" };
const FULL_ROWS = 300; // tables up to this many rows (groups included) are drawn whole
const OVERSCAN = 25; // rows drawn beyond each edge of the view of a longer table
const COLLATOR = new Intl.Collator("en");
// What the last render computed, for redrawing the rows in view on a scroll without sorting again:
// items (group and peer rows, in order), their tops in px, cols and what each row needs.
let model = null;
let rowH = 24; // a peer row's height in px, measured once rows exist
let groupH = 27; // a group row's height
let scrollQueued = false;

const byId = (a, b) => (a.peer_id < b.peer_id ? -1 : a.peer_id > b.peer_id ? 1 : 0);

/** Sort `peers` by `col` (unknowns last both ways, ties by peer id); each value computed once. */
function sortPeers(peers, col, dir) {
  const keyed = peers.map((p) => {
    const v = col.sort(p);
    return { p, v, u: unknown(v) };
  });
  keyed.sort((a, b) => {
    if (a.u !== b.u) return a.u ? 1 : -1;
    if (!a.u && a.v !== b.v) {
      const c =
        typeof a.v === "number" && typeof b.v === "number"
          ? a.v - b.v
          : COLLATOR.compare(String(a.v), String(b.v));
      if (c) return c * dir;
    }
    return byId(a.p, b.p);
  });
  return keyed.map((k) => k.p);
}

function matches(p) {
  if (view.state === "live" && departed(p)) return false;
  if (view.state && view.state !== "live" && p.state !== view.state) return false;
  if (!view.filter) return true;
  const q = view.filter.toLowerCase();
  return [p.peer_id, p.address, p.device, p.state].some(
    (v) => !unknown(v) && String(v).toLowerCase().includes(q),
  );
}

export function setupPeerTable(onSelect) {
  tableScroll = watchSideScroll(
    $("peer-table-frame"),
    $("peer-table-wrap"),
    $("peer-table-scroll"),
    (side) => `wider than the screen: scroll the table sideways ${ARROWS[side]} for all columns`,
  );
  $("peer-filter").addEventListener("input", (ev) => {
    view.filter = ev.target.value.trim();
    rerender();
  });
  $("peer-state-filter").addEventListener("change", (ev) => {
    view.state = ev.target.value;
    rerender();
  });
  $("group-by-stage").addEventListener("change", (ev) => {
    view.group = ev.target.checked;
    rerender();
  });
  $("peer-table-wrap").addEventListener(
    "scroll",
    () => {
      if (!model || model.items.length <= FULL_ROWS || scrollQueued) return;
      scrollQueued = true;
      requestAnimationFrame(() => {
        scrollQueued = false;
        drawRows();
      });
    },
    { passive: true },
  );
  $("peer-rows").addEventListener("click", (ev) => {
    const row = ev.target.closest("tr[data-peer-id]");
    if (row) onSelect(row.dataset.peerId);
  });
  $("peer-table")
    .querySelector("thead")
    .addEventListener("click", (ev) => {
      const th = ev.target.closest("th[data-sort]");
      if (!th) return;
      if (view.sortKey === th.dataset.sort) view.sortDir = -view.sortDir;
      else {
        view.sortKey = th.dataset.sort;
        view.sortDir = ["sps", "rx", "tx", "down", "up", "queue", "loss"].includes(th.dataset.sort)
          ? -1
          : 1;
      }
      rerender();
    });
}

function rerender() {
  if (lastArgs) renderPeerTable(...lastArgs);
}

export function renderPeerTable(s, rates, selected) {
  lastArgs = [s, rates, selected];
  const now = toSeconds(s.now) ?? Date.now() / 1000;
  const cols = columns(rates, now, s.peers ?? []);
  const colsKey = cols.map((c) => c.key).join(",");
  const head = $("peer-head");
  reconcile(
    head,
    cols,
    (c) => c.key,
    (c) => {
      const th = el("th", c.num ? "num" : "", c.label);
      th.dataset.sort = c.key;
      th.tabIndex = 0;
      th.title = "sort";
      return th;
    },
    (th, c) => {
      const dir = view.sortKey === c.key ? (view.sortDir > 0 ? "ascending" : "descending") : "none";
      if (th.getAttribute("aria-sort") !== dir) th.setAttribute("aria-sort", dir);
    },
  );

  const peers = s.peers ?? [];
  const shown = peers.filter(matches);
  const col = cols.find((c) => c.key === view.sortKey) ?? cols[1];
  const sorted = sortPeers(shown, col, view.sortDir);
  let items = sorted.map((p) => ({ p }));
  if (view.group) {
    const groups = new Map();
    for (const p of sorted) {
      const n = stageOf(p.stage);
      if (!groups.has(n)) groups.set(n, []);
      groups.get(n).push(p);
    }
    const order = [...groups.keys()].sort((a, b) => (a ?? 1e9) - (b ?? 1e9));
    items = [];
    for (const n of order) {
      const at = items.length; // the group row's index, for its rows' `in`
      items.push({ group: n, peers: groups.get(n) });
      for (const p of groups.get(n)) items.push({ p, in: at });
    }
  }
  setText(
    $("peer-count"),
    shown.length === peers.length
      ? `${peers.length} peer${peers.length === 1 ? "" : "s"}`
      : `${shown.length} of ${peers.length} peers`,
  );
  setText(
    $("peer-empty"),
    peers.length ? (shown.length ? "" : "no peer matches the filter") : "no peers yet",
  );
  model = { items, cols, colsKey, selected, tops: null };
  drawRows();
  tableScroll();
}

/** The tops (px, from the first row) of `items` and the whole height, for the current heights. */
function layout(items) {
  const tops = new Float64Array(items.length + 1);
  for (let i = 0; i < items.length; i += 1) {
    tops[i + 1] = tops[i] + ("group" in items[i] ? groupH : rowH);
  }
  return tops;
}

/** The first index whose row ends below `y` (binary search over tops). */
function rowAt(tops, y) {
  let lo = 0;
  let hi = tops.length - 2;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (tops[mid + 1] <= y) lo = mid + 1;
    else hi = mid;
  }
  return Math.max(0, lo);
}

/** Which items to draw: all of a short table, the ones in view (and around) of a long one. */
function windowOf(m) {
  const n = m.items.length;
  if (n <= FULL_ROWS) return { start: 0, end: n, group: null };
  m.tops ??= layout(m.items);
  const wrap = $("peer-table-wrap");
  const headH = $("peer-head").offsetHeight;
  const y = Math.max(0, wrap.scrollTop - headH);
  const first = rowAt(m.tops, y);
  const last = rowAt(m.tops, y + wrap.clientHeight);
  const start = Math.max(0, first - OVERSCAN);
  const end = Math.min(n, last + 1 + OVERSCAN);
  const it = m.items[start];
  const group = it && "in" in it ? it.in : null; // the stage group of the first row drawn
  return { start, end, group };
}

function spacer(key, px) {
  return { spacer: key, px };
}

/** Draw the rows of the last render's model that belong on screen now. */
function drawRows() {
  const m = model;
  if (!m) return;
  const { items, cols, colsKey, selected } = m;
  const { start, end, group } = windowOf(m);
  let rows = items.slice(start, end);
  if (items.length > FULL_ROWS) {
    const above = m.tops[start] - (group === null ? 0 : groupH);
    rows = [
      spacer("top", above),
      ...(group === null ? [] : [items[group]]),
      ...rows,
      spacer("bottom", m.tops[items.length] - m.tops[end]),
    ];
  }
  reconcile(
    $("peer-rows"),
    rows,
    // a row is rebuilt when the set of columns changes (an optional one appears or goes)
    (it) =>
      "spacer" in it
        ? `s:${it.spacer}:${colsKey}`
        : "group" in it
          ? `g:${it.group}:${colsKey}`
          : `p:${it.p.peer_id}:${colsKey}`,
    (it) => {
      const tr = el("tr");
      if ("spacer" in it || "group" in it) {
        tr.className = "spacer" in it ? "spacer" : "group";
        const td = el("td");
        td.colSpan = cols.length;
        tr.append(td);
        if ("spacer" in it) tr.setAttribute("aria-hidden", "true");
      } else {
        for (const c of cols) tr.append(el("td", c.num ? `num c-${c.key}` : `c-${c.key}`));
        tr.children[2].prepend(el("span", "dot"));
        tr.children[2].append(el("span", "state-text"));
      }
      return tr;
    },
    (tr, it) => {
      if ("spacer" in it) {
        const h = `${Math.max(0, it.px)}px`;
        if (tr.firstChild.style.height !== h) tr.firstChild.style.height = h;
        return;
      }
      if ("group" in it) {
        const live = it.peers.filter((p) => !departed(p)).length;
        setData(tr, "groupStage", it.group);
        setText(
          tr.firstChild,
          `${it.group === null ? "no stage" : `Stage ${it.group}`} · ${live} live` +
            (live === it.peers.length ? "" : ` · ${it.peers.length - live} gone`),
        );
        return;
      }
      const p = it.p;
      setData(tr, "peerId", p.peer_id);
      setData(tr, "stage", stageOf(p.stage));
      setData(tr, "state", p.state);
      setData(tr, "link", reachOf(p));
      tr.classList.toggle("departed", departed(p));
      tr.classList.toggle("selected", p.peer_id === selected);
      cols.forEach((c, i) => {
        const td = tr.children[i];
        if (c.key === "state") setText(td.lastChild, c.text(p));
        else setText(td, c.text(p));
      });
      if (tr.firstChild.title !== p.peer_id) tr.firstChild.title = p.peer_id;
    },
  );
  if (items.length > FULL_ROWS) measure(m);
}

/** Learn the rows' real heights; when they differ from the guess, lay out and draw again. */
function measure(m) {
  const body = $("peer-rows");
  const row = body.querySelector("tr[data-peer-id]");
  const grp = body.querySelector("tr.group");
  const r = row ? row.getBoundingClientRect().height : rowH;
  const g = grp ? grp.getBoundingClientRect().height : groupH;
  if (Math.abs(r - rowH) < 0.5 && Math.abs(g - groupH) < 0.5) return;
  rowH = r || rowH;
  groupH = g || groupH;
  m.tops = null;
  drawRows();
}

/** Scroll the peer table (not the page) so that the peer's row shows below the sticky headers,
 * drawing it first when it is out of view in a long table. */
export function revealPeer(peerId) {
  const wrap = $("peer-table-wrap");
  const find = () => wrap.querySelector(`tr[data-peer-id="${CSS.escape(peerId)}"]`);
  if (!find() && model && model.items.length > FULL_ROWS) {
    const i = model.items.findIndex((it) => it.p?.peer_id === peerId);
    if (i < 0) return;
    model.tops ??= layout(model.items);
    wrap.scrollTop = model.tops[i] + $("peer-head").offsetHeight - wrap.clientHeight / 2;
    drawRows();
  }
  const row = find();
  if (!row) return;
  const w = wrap.getBoundingClientRect();
  const r = row.getBoundingClientRect();
  const group = wrap.querySelector("tr.group");
  const top = w.top + $("peer-head").offsetHeight + (group ? group.offsetHeight : 0);
  if (r.top < top) wrap.scrollTop -= top - r.top;
  else if (r.bottom > w.bottom) wrap.scrollTop += r.bottom - w.bottom;
}

// ---------------------------------------------------------------------------------------------
// Peer detail drawer

export function renderPeerDetail(s, rates, selected) {
  const drawer = $("peer-detail");
  const p = (s.peers ?? []).find((x) => x.peer_id === selected);
  drawer.hidden = !selected;
  if (!selected) return;
  setData(drawer, "peerId", selected);
  setText($("detail-title"), `Peer ${shortId(selected)}`);
  const r = rates.get(selected);
  const now = toSeconds(s.now) ?? Date.now() / 1000;
  const rows = p
    ? [
        ["id", p.peer_id],
        ["state", p.state],
        ["stage", stageOf(p.stage) ?? "–"],
        ["address", p.address ?? "–"],
        ["device", p.device ?? "–"],
        ...(fmtDeviceMemory(p) === null ? [] : [["device memory", fmtDeviceMemory(p)]]),
        ...(unknown(p.memory_bytes) ? [] : [["host memory", fmtBytes(p.memory_bytes)]]),
        ...(unknown(p.link) ? [] : [["link", p.link]]),
        [
          "joined",
          unknown(p.joined_at)
            ? "–"
            : `${fmtClock(p.joined_at)} (${fmtDuration(now - toSeconds(p.joined_at))} ago)`,
        ],
        ["lease expires", unknown(p.lease_expires) ? "–" : `${fmtClock(p.lease_expires)}`],
        ...(unknown(p.last_seen)
          ? []
          : [
              [
                "last seen",
                `${fmtClock(p.last_seen)} (${fmtDuration(now - toSeconds(p.last_seen))} ago)`,
              ],
            ]),
        ["samples/s", fmtNum(p.samples_per_s)],
        ["tokens/s", fmtNum(p.tokens_per_s, 0)],
        ["queue", p.queue ?? "–"],
        ["step", p.step ?? "–"],
        ["loss", unknown(p.loss) ? "–" : Number(p.loss).toFixed(4)],
        ["sent", `${fmtBytes(p.bytes_sent)} (now ${fmtRate(r.up)})`],
        ["received", `${fmtBytes(p.bytes_received)} (now ${fmtRate(r.down)})`],
        ["dropped microbatches", p.dropped_microbatches ?? "–"],
        ...Object.entries(p.bytes_by_kind ?? {}).map(([k, v]) => [`bytes · ${k}`, fmtBytes(v)]),
      ]
    : [
        ["id", selected],
        ["state", "no longer reported by the coordinator"],
      ];
  reconcile(
    $("detail-fields"),
    rows,
    (r2) => r2[0],
    () => {
      const div = el("div", "field");
      div.append(el("dt"), el("dd"));
      return div;
    },
    (div, [k, v]) => {
      setText(div.firstChild, k);
      setText(div.lastChild, v);
    },
  );
}
