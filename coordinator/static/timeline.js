// The timeline: the coordinator's events, newest first, filterable by kind (chips); clicking an
// event about a peer selects that peer. Updated in place, keyed by event, like the other views.

import {
  el,
  fmtClock,
  fmtDateTime,
  reconcile,
  setData,
  setText,
  shortId,
  stageOf,
  unknown,
} from "./util.js";

const $ = (id) => document.getElementById(id);

const KIND_TEXT = {
  join: "joined",
  rejoin: "re-joined",
  leave: "left",
  expire: "lease expired",
  drain: "draining",
  move: "moved",
  rebuild: "stage rebuilt",
  restart: "coordinator restarted",
  skip: "stage bypassed (no live replica)",
  state: "state",
  start: "run started",
};
// Kinds hidden until the user asks: "state" (every joining -> training step) drowns the rest.
const timelineFilter = new Set(["state"]);

export function renderTimeline(s, onSelect) {
  const events = (s.events ?? []).slice(-500);
  const counts = {};
  for (const e of events) counts[e.kind] = (counts[e.kind] ?? 0) + 1;
  const kinds = Object.keys(counts).sort();
  reconcile(
    $("timeline-kinds"),
    kinds,
    (k) => k,
    (k) => {
      const b = el("button", "kind-chip");
      b.type = "button";
      setData(b, "kind", k);
      b.addEventListener("click", () => {
        if (timelineFilter.has(k)) timelineFilter.delete(k);
        else timelineFilter.add(k);
        renderTimeline(window.__shoal.status, onSelect);
      });
      return b;
    },
    (b, k) => {
      setText(b, `${k} ${counts[k]}`);
      b.setAttribute("aria-pressed", String(!timelineFilter.has(k)));
    },
  );
  const shown = events
    .map((e, i) => ({ e, key: `${e.t}|${e.kind}|${e.peer_id ?? ""}|${e.stage ?? ""}|${i}` }))
    .filter(({ e }) => !timelineFilter.has(e.kind))
    .reverse()
    .slice(0, 300);
  setText($("timeline-empty"), shown.length ? "" : "no events yet");
  reconcile(
    $("timeline"),
    shown,
    (x) => x.key,
    () => {
      const li = el("li", "event");
      li.append(el("time", "ev-time"), el("span", "ev-kind"), el("span", "ev-text"));
      li.addEventListener("click", () => li.dataset.peerId && onSelect(li.dataset.peerId));
      return li;
    },
    (li, { e }) => {
      setData(li, "kind", e.kind);
      setData(li, "peerId", e.peer_id);
      setData(li, "stage", stageOf(e.stage));
      setText(li.children[0], fmtClock(e.t));
      const when = fmtDateTime(e.t);
      if (li.children[0].title !== when) li.children[0].title = when;
      setText(li.children[1], e.kind);
      const who = [
        unknown(e.peer_id) ? null : `peer ${shortId(e.peer_id)}`,
        stageOf(e.stage) === null ? null : `stage ${stageOf(e.stage)}`,
      ]
        .filter(Boolean)
        .join(" · ");
      const detail = unknown(e.detail)
        ? ""
        : typeof e.detail === "string"
          ? e.detail
          : JSON.stringify(e.detail);
      setText(
        li.children[2],
        [KIND_TEXT[e.kind] ?? e.kind, who, detail].filter(Boolean).join(" — "),
      );
    },
  );
}
