// Charts: loss over steps and tokens/s over time (uPlot, vendored under static/vendor/uplot),
// and bytes per optimizer step by sync mode (plain HTML bars on a log scale: the modes differ by
// up to six orders of magnitude, from dense all-reduce to one byte per peer and step for SPSA).

import { el, fmtBytes, fmtInt, reconcile, setData, setText, toSeconds, unknown } from "./util.js";

const uPlot = globalThis.uPlot;
const INK = "#2b3440";
const GRID = "#e6e9ef";

function axis(extra = {}) {
  return {
    stroke: INK,
    grid: { stroke: GRID, width: 1 },
    ticks: { stroke: GRID, width: 1 },
    font: "11px system-ui, sans-serif",
    ...extra,
  };
}

/** HH:MM, 24-hour, for time axes. */
const HHMM = new Intl.DateTimeFormat("en-GB", {
  hour: "2-digit",
  minute: "2-digit",
  hour12: false,
});
const HHMMSS = new Intl.DateTimeFormat("en-GB", {
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
  hour12: false,
});
const clock = (t) => HHMM.format(new Date(t * 1000));
const clockS = (t) => HHMMSS.format(new Date(t * 1000));

/** One line chart that follows its container's width. */
class LineChart {
  constructor(container, { label, color, xTime, yFormat }) {
    this.container = container;
    this.plot = null;
    this.empty = el("div", "chart-empty", "no data yet");
    container.append(this.empty);
    if (!uPlot) {
      setText(this.empty, "charts unavailable (static/vendor/uplot did not load)");
      return;
    }
    const yValues = (u, ticks) => ticks.map(yFormat);
    this.plot = new uPlot(
      {
        width: Math.max(200, container.clientWidth),
        height: 190,
        legend: { show: false },
        cursor: { drag: { x: false, y: false }, points: { size: 6 } },
        scales: { x: { time: xTime } },
        axes: [
          axis(
            xTime
              ? { values: (u, ticks, i, space, incr) => ticks.map(incr < 60 ? clockS : clock) }
              : {},
          ),
          axis({ values: yValues, size: 56 }),
        ],
        series: [
          {},
          { label, stroke: color, width: 2, fill: `${color}1a`, points: { show: false } },
        ],
      },
      [[], []],
      container,
    );
    new ResizeObserver(() => {
      const w = Math.max(200, this.container.clientWidth);
      if (Math.abs(w - this.plot.width) > 2) this.plot.setSize({ width: w, height: 190 });
    }).observe(container);
  }

  setData(xs, ys) {
    const has = ys.some((y) => y !== null);
    this.empty.hidden = has;
    this.container.dataset.points = String(xs.length);
    if (this.plot) this.plot.setData([xs, ys]);
  }
}

export class Charts {
  constructor() {
    this.loss = new LineChart(document.getElementById("chart-loss"), {
      label: "loss",
      color: "#d9480f",
      xTime: false,
      yFormat: (v) => v.toFixed(2),
    });
    this.tokens = new LineChart(document.getElementById("chart-tokens"), {
      label: "tokens/s",
      color: "#1c7ed6",
      xTime: true,
      yFormat: (v) => (v >= 1000 ? `${(v / 1000).toFixed(v >= 1e4 ? 0 : 1)}k` : v.toFixed(0)),
    });
    this.lastKey = "";
  }

  /** Redraw from `history` (the whole curve comes with every status; skip when unchanged). */
  update(history) {
    const h = Array.isArray(history) ? history : [];
    const last = h[h.length - 1];
    const key = `${h.length}:${last ? `${last.t}:${last.step}` : ""}`;
    if (key === this.lastKey) return;
    this.lastKey = key;
    const num = (v) => (unknown(v) ? null : Number(v));
    // Loss over steps: the x values must increase; points without a step fall back to index.
    const byStep = h
      .map((p, i) => [unknown(p.step) ? i : Number(p.step), num(p.loss)])
      .sort((a, b) => a[0] - b[0]);
    this.loss.setData(
      byStep.map((p) => p[0]),
      byStep.map((p) => p[1]),
    );
    const byTime = h
      .map((p) => [toSeconds(p.t), num(p.tokens_per_s)])
      .filter((p) => p[0] !== null)
      .sort((a, b) => a[0] - b[0]);
    this.tokens.setData(
      byTime.map((p) => p[0]),
      byTime.map((p) => p[1]),
    );
  }
}

/** 32.4 -> "32", 655360 -> "655k". */
function fmtRatio(r) {
  if (r >= 1e6) return `${(r / 1e6).toFixed(1)}M`;
  if (r >= 1e4) return `${(r / 1e3).toFixed(0)}k`;
  return r >= 10 ? r.toFixed(0) : r.toFixed(1);
}

const MODE_ORDER = ["allreduce", "demo", "diloco", "spsa"];

/** Horizontal bars of bytes per optimizer step per sync mode, log scale, the run's mode marked. */
export function renderBytesByMode(container, byMode, currentMode) {
  const entries = Object.entries(byMode || {}).filter(([, v]) => !unknown(v) && v > 0);
  entries.sort((a, b) => {
    const ia = MODE_ORDER.indexOf(a[0]);
    const ib = MODE_ORDER.indexOf(b[0]);
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a[0].localeCompare(b[0]);
  });
  const empty =
    container.querySelector(".chart-empty") ||
    container.appendChild(
      el("div", "chart-empty", "no sync-mode figures from the coordinator yet"),
    );
  empty.hidden = entries.length > 0;
  let list = container.querySelector("ul.bars");
  if (!list) list = container.appendChild(el("ul", "bars"));
  const max = Math.max(1, ...entries.map(([, v]) => v));
  const base = byMode?.allreduce;
  // log10(1 + v) so that one byte still shows a sliver and the largest fills the bar.
  const frac = (v) => Math.log10(1 + v) / Math.log10(1 + max);
  reconcile(
    list,
    entries,
    ([mode]) => mode,
    () => {
      const li = el("li", "bar-row");
      li.append(el("span", "bar-mode"), el("span", "bar-track"), el("span", "bar-value"));
      li.children[1].append(el("span", "bar-fill"));
      return li;
    },
    (li, [mode, v]) => {
      setData(li, "mode", mode);
      li.classList.toggle("current", mode === currentMode);
      setText(li.children[0], mode);
      li.children[1].firstChild.style.width = `${(100 * frac(v)).toFixed(1)}%`;
      const ratio = !unknown(base) && base > 0 && mode !== "allreduce" ? base / v : null;
      const ratioText = ratio === null ? "" : ` · ${fmtRatio(ratio)}× less than allreduce`;
      setText(
        li.children[2],
        `${fmtBytes(v)}${ratioText}${mode === currentMode ? " · this run" : ""}`,
      );
      li.title = `${mode}: ${fmtInt(v)} bytes per optimizer step`;
    },
  );
  const note = container.querySelector(".bars-note") || container.appendChild(el("p", "bars-note"));
  setText(note, "log scale · bytes on the wire per optimizer step, whole swarm, run average");
}
