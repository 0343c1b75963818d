// The summary cards, the stage map and the timeline. Each render* function takes the whole
// /api/status document and updates its part of the page in place (keyed by peer id / stage / event)
// so that a second-by-second refresh neither flickers nor loses hover and scroll.

import { swarmEmptiness } from "./join.js";
import { watchSideScroll } from "./scroll.js";
import {
  departed,
  el,
  fmtBytes,
  fmtDateTime,
  fmtDuration,
  fmtInt,
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

export const STATES = ["joining", "syncing", "training", "draining", "lost", "rebuilt", "left"];
// A stage's `rebuild` is set while it has no replica (paths bypass it): how its next holder
// will rebuild it. What the holder actually did shows in the timeline's "rebuild" event.
const REBUILD_LABEL = {
  checkfree: "bypassed · to rebuild by CheckFree",
  "checkfree+": "bypassed · to rebuild by CheckFree+",
  snapshot: "bypassed · to restore a snapshot (degraded)",
  copy: "bypassed · to copy",
};
const COMPACT_ABOVE = 12; // tiles per stage beyond which tiles become small squares
// Tiles per stage at most: a stage of a thousand replicas would be a wall of squares taller than
// the screen (and slow to draw). Beyond it the stage shows the selected peer, then the peers not
// simply training (lost, joining, syncing, draining, rebuilt: what needs a look), then training
// ones, then departed ones, in the usual order, and a "+N more" chip counts the rest by state; the
// peer table lists every peer.
export const TILE_CAP = 120;
const TILE_RANK = { training: 2, left: 3 };
// What a stage column shows (data-view): the coordinator's state, except "waiting" while no peer
// has ever joined (nothing is wrong yet) and "rebuilding" while a pending rebuild has holders
// that are not ready yet (a bypassed stage never says "ok").
const VIEW_BADGE = { empty: "EMPTY", waiting: "waiting", rebuilding: "rebuilding" };
const VIEW_NOTE = {
  empty: "no live replica: SkipPipe routes around this stage until it is rebuilt",
  degraded: "one replica or fewer training: a failure here empties the stage",
  rebuilding: "paths bypass this stage until a holder has rebuilt it",
  waiting: "",
};
const ARROWS = { left: "←", right: "→", both: "← →" };
let mapScroll = null;

const $ = (id) => document.getElementById(id);

/** The latest non-null value of `key` in history. */
function latest(history, key) {
  for (let i = (history?.length ?? 0) - 1; i >= 0; i -= 1) {
    if (!unknown(history[i][key])) return history[i][key];
  }
  return null;
}

export function countStates(peers) {
  const counts = Object.fromEntries(STATES.map((s) => [s, 0]));
  for (const p of peers) counts[p.state] = (counts[p.state] ?? 0) + 1;
  return counts;
}

// ---------------------------------------------------------------------------------------------
// Header and summary cards

export function renderSummary(s, rates) {
  const run = s.run ?? {};
  const peers = s.peers ?? [];
  const totals = s.totals ?? {};
  const history = s.history ?? [];
  setText($("run-name"), run.name ?? "unnamed run");
  setText($("swarm-id"), unknown(run.swarm_id) ? "" : `swarm ${run.swarm_id}`);
  setText($("sync-mode"), unknown(run.sync_mode) ? "sync ?" : `sync ${run.sync_mode}`);
  setData($("sync-mode"), "mode", run.sync_mode);

  const stageSteps = (s.stages ?? []).map((st) => st.step).filter((v) => !unknown(v));
  const step = unknown(totals.step)
    ? stageSteps.length
      ? Math.max(...stageSteps)
      : null
    : totals.step;
  setText($("m-step"), fmtInt(step));
  setText($("m-step-sub"), unknown(s.epoch) ? "epoch –" : `epoch ${s.epoch}`);

  let loss = latest(history, "loss");
  if (unknown(loss)) {
    const ls = peers.filter((p) => !unknown(p.loss) && !departed(p)).map((p) => p.loss);
    loss = ls.length ? ls.reduce((a, b) => a + b, 0) / ls.length : null;
  }
  setText($("m-loss"), unknown(loss) ? "–" : Number(loss).toFixed(3));
  const ago = history.length > 50 ? history[history.length - 51].loss : null;
  setText(
    $("m-loss-sub"),
    unknown(ago) || unknown(loss)
      ? "stage 0, latest"
      : `${loss <= ago ? "▼" : "▲"} ${Math.abs(loss - ago).toFixed(3)} over 50 points`,
  );

  const live = peers.filter((p) => !departed(p));
  const tps = latest(history, "tokens_per_s");
  setText($("m-tokens"), fmtNum(tps, 0));
  const sps = live.reduce((a, p) => a + (unknown(p.samples_per_s) ? 0 : p.samples_per_s), 0);
  setText($("m-tokens-sub"), `Σ ${fmtNum(sps, 1)} samples/s`);

  const counts = countStates(peers);
  const livePeers = unknown(totals.live_peers) ? live.length : totals.live_peers;
  const allPeers = unknown(totals.peers) ? peers.length : totals.peers;
  setText($("m-peers"), `${livePeers} / ${allPeers}`);
  $("m-peers").classList.toggle("long", $("m-peers").textContent.length > 9);
  setText(
    $("m-peers-sub"),
    STATES.filter((k) => counts[k])
      .map((k) => `${counts[k]} ${k}`)
      .join(" · ") || "no peers yet",
  );

  let up = 0;
  let down = 0;
  for (const p of live) {
    const r = rates.get(p.peer_id);
    up += r.up ?? 0;
    down += r.down ?? 0;
  }
  setText($("m-bytes"), `↑ ${fmtBytes(totals.bytes_sent)}  ↓ ${fmtBytes(totals.bytes_received)}`);
  setText($("m-bytes-sub"), `now ↑ ${fmtRate(up)}  ↓ ${fmtRate(down)}`);
  setText($("m-dropped"), fmtInt(totals.dropped_microbatches));
  setText($("m-dropped-sub"), "microbatches");

  const c = s.coordinator ?? {};
  setText($("m-coord"), fmtDuration(c.uptime_s));
  const restarts = unknown(c.restarts) ? "–" : c.restarts;
  setText(
    $("m-coord-sub"),
    `up · ${restarts} restart${c.restarts === 1 ? "" : "s"}` +
      (unknown(c.version) ? "" : ` · v${c.version}`),
  );
  setText(
    $("footer-coord"),
    [
      unknown(c.grpc_address) ? null : `gRPC ${c.grpc_address}`,
      unknown(c.started_at) ? null : `started ${fmtDateTime(c.started_at)}`,
      unknown(c.version) ? null : `shoal ${c.version}`,
    ]
      .filter(Boolean)
      .join(" · "),
  );
}

// ---------------------------------------------------------------------------------------------
// Stage map

function stageColumns(s) {
  const peers = s.peers ?? [];
  const byId = new Map(peers.map((p) => [p.peer_id, p]));
  const cols = new Map();
  for (const st of s.stages ?? []) {
    const n = stageOf(st.stage);
    if (n !== null) cols.set(n, { info: st, peers: [] });
  }
  for (const p of peers) {
    const n = stageOf(p.stage);
    if (n === null) continue;
    if (!cols.has(n)) cols.set(n, { info: { stage: n, replicas: [], state: null }, peers: [] });
    cols.get(n).peers.push(p);
  }
  for (const [n, col] of cols) {
    // replicas the coordinator lists but sent no peer entry for
    for (const id of col.info.replicas ?? []) {
      if (!byId.has(id)) col.peers.push({ peer_id: id, stage: n, state: "training" });
    }
    col.peers.sort(
      (a, b) =>
        departed(a) - departed(b) ||
        (toSeconds(a.joined_at) ?? 0) - (toSeconds(b.joined_at) ?? 0) ||
        String(a.peer_id).localeCompare(String(b.peer_id)),
    );
  }
  return [...cols.entries()].sort((a, b) => a[0] - b[0]).map(([n, col]) => ({ n, ...col }));
}

/** The peers a stage shows as tiles (at most TILE_CAP, see above) and the ones it does not. */
function capTiles(peers, selected) {
  if (peers.length <= TILE_CAP) return { tiles: peers, rest: [] };
  const rank = (p) => (p.peer_id === selected ? 0 : (TILE_RANK[p.state] ?? 1));
  const order = peers.map((p, i) => ({ i, r: rank(p) }));
  order.sort((a, b) => a.r - b.r || a.i - b.i);
  const keep = order.slice(0, TILE_CAP).map((x) => x.i);
  keep.sort((a, b) => a - b);
  const kept = new Set(keep);
  return { tiles: keep.map((i) => peers[i]), rest: peers.filter((_, i) => !kept.has(i)) };
}

function moreText(rest) {
  const counts = countStates(rest);
  const by = STATES.filter((k) => counts[k]).map((k) => `${counts[k]} ${k}`);
  const long = `${rest.length} more peers (${by.join(", ")}): all are in the peer table`;
  return { short: `+${rest.length}`, long };
}

function tileTitle(p, rates) {
  const r = rates.get(p.peer_id);
  return [
    `${p.peer_id}  (${p.state})`,
    `stage ${stageOf(p.stage) ?? "–"} · ${p.device ?? "device ?"}`,
    `${fmtNum(p.samples_per_s)} samples/s · queue ${p.queue ?? "–"}`,
    unknown(p.link) ? null : `link: ${p.link}`,
    `↑ ${fmtRate(r.up)}  ↓ ${fmtRate(r.down)}`,
    unknown(p.loss) ? null : `loss ${Number(p.loss).toFixed(3)}`,
  ]
    .filter(Boolean)
    .join("\n");
}

function stageView(state, info, live, waiting) {
  if (waiting) return "waiting";
  if (!unknown(info.rebuild)) return live.length ? "rebuilding" : "empty";
  return state;
}

export function renderStageMap(s, rates, onSelect, selected = null) {
  const cols = stageColumns(s);
  const map = $("stage-map");
  const waiting = swarmEmptiness(s) === "never";
  map.classList.toggle("waiting", waiting);
  mapScroll ??= watchSideScroll(
    $("stage-map-wrap"),
    map,
    $("stage-map-scroll"),
    (side) => `${map.children.length} stages: scroll sideways ${ARROWS[side]} for the rest`,
  );
  const compact = Math.max(0, ...cols.map((c) => c.peers.length)) > COMPACT_ABOVE;
  map.classList.toggle("compact", compact);
  map.style.setProperty("--stage-count", String(Math.max(1, cols.length)));
  setText($("stage-map-empty"), cols.length ? "" : "the coordinator reports no stages yet");
  reconcile(
    map,
    cols,
    (c) => c.n,
    (c) => {
      const col = el("div", "stage");
      const head = el("div", "stage-head");
      head.append(
        el("span", "stage-name"),
        el("span", "badge state-badge"),
        el("span", "badge rebuild-badge"),
      );
      col.append(
        head,
        el("div", "stage-role"),
        el("div", "stage-meta"),
        el("div", "tiles"),
        el("div", "stage-note"),
      );
      col.querySelector(".tiles").addEventListener("click", (ev) => {
        const tile = ev.target.closest(".tile");
        if (tile) onSelect(tile.dataset.peerId);
      });
      return col;
    },
    (col, c) => {
      const info = c.info;
      const live = c.peers.filter((p) => !departed(p));
      const state = info.state ?? (live.length ? "ok" : "empty");
      setData(col, "stage", c.n);
      setData(col, "state", state);
      setData(col, "rebuild", info.rebuild);
      const view = stageView(state, info, live, waiting);
      setData(col, "view", view);
      const [name, badge, rebuild] = col.firstChild.children;
      setText(name, `Stage ${c.n}`);
      setText(badge, VIEW_BADGE[view] ?? view);
      setData(badge, "state", view);
      setText(
        rebuild,
        unknown(info.rebuild) ? "" : (REBUILD_LABEL[info.rebuild] ?? `to rebuild · ${info.rebuild}`),
      );
      rebuild.hidden = unknown(info.rebuild);
      setText(col.children[1], c.n === 0 ? "data · embedding · head · loss" : "block stage");
      const replicas = (info.replicas ?? live).length;
      setText(
        col.children[2],
        [
          `${replicas} replica${replicas === 1 ? "" : "s"}`,
          unknown(info.throughput) ? null : `${fmtNum(info.throughput)} samples/s`,
          unknown(info.grad_norm) ? null : `‖g‖ ${fmtNum(info.grad_norm, 2)}`,
          unknown(info.step) ? null : `step ${fmtInt(info.step)}`,
        ]
          .filter(Boolean)
          .join(" · "),
      );
      const { tiles, rest } = capTiles(c.peers, selected);
      const items = rest.length ? [...tiles, { more: rest }] : tiles;
      reconcile(
        col.children[3],
        items,
        (p) => ("more" in p ? "+more" : p.peer_id),
        (p) => {
          if ("more" in p) return el("span", "tile-more");
          const t = el("button", "tile");
          t.type = "button";
          t.append(el("span", "tile-id"), el("span", "tile-sub"));
          return t;
        },
        (t, p) => {
          if ("more" in p) {
            const text = moreText(p.more);
            setData(t, "more", p.more.length);
            setText(t, text.short);
            if (t.title !== text.long) t.title = text.long;
            t.setAttribute("aria-label", text.long);
            return;
          }
          setData(t, "peerId", p.peer_id);
          setData(t, "state", p.state);
          setData(t, "link", p.link);
          t.classList.toggle("departed", departed(p));
          t.classList.toggle("selected", p.peer_id === selected);
          setText(t.firstChild, shortId(p.peer_id));
          setText(t.lastChild, departed(p) ? p.state : `${fmtNum(p.samples_per_s)}/s`);
          const title = tileTitle(p, rates);
          if (t.title !== title) t.title = title;
          t.setAttribute("aria-label", `peer ${p.peer_id}, ${p.state}`);
        },
      );
      const note = VIEW_NOTE[view] ?? "";
      setText(col.children[4], note);
      col.children[4].hidden = !note;
    },
  );
  mapScroll();
  renderLegend(countStates(s.peers ?? []));
}

function renderLegend(counts) {
  const shown = STATES.filter((k) => k !== "left" || counts[k]); // "left" only once someone left
  reconcile(
    $("legend"),
    shown,
    (k) => k,
    (k) => {
      const item = el("span", "legend-item");
      item.append(el("span", "swatch"), el("span", "legend-label"));
      setData(item, "legendState", k);
      return item;
    },
    (item, k) => setText(item.lastChild, `${k} ${counts[k] ?? 0}`),
  );
}
