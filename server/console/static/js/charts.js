// Small SVG charts: lines, a heatmap, horizontal bars, scatter plots. Sizes are fixed by the
// viewBox, so live updates never move the layout.
import { h, s, fmtNum } from "./dom.js";

const TABLEAU = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
  "#9c755f", "#bab0ac"];
export function classColor(i, n) {
  return n <= TABLEAU.length ? TABLEAU[i] : `hsl(${Math.round((i * 137.508) % 360)}, 60%, 48%)`;
}

function ticks(lo, hi, n = 4) {
  if (!(hi > lo)) return [lo];
  return Array.from({ length: n + 1 }, (_, i) => lo + ((hi - lo) * i) / n);
}

// One line chart. series: [{name, ys, color}] over shared xs.
export function lineChart({ title, xs, series, xLabel = "epoch", yMin, yMax, format = fmtNum }) {
  const W = 320, H = 190, L = 48, R = 10, T = 10, B = 34;
  const all = series.flatMap((d) => d.ys).filter((y) => y !== null && y !== undefined && Number.isFinite(y));
  let lo = yMin ?? Math.min(...all), hi = yMax ?? Math.max(...all);
  if (!all.length) { lo = 0; hi = 1; }
  if (hi === lo) { hi = lo + (Math.abs(lo) || 1) * 0.1; lo -= (Math.abs(lo) || 1) * 0.1; }
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const px = (x) => L + (x1 > x0 ? ((x - x0) / (x1 - x0)) * (W - L - R) : (W - L - R) / 2);
  const py = (y) => T + (1 - (y - lo) / (hi - lo)) * (H - T - B);
  const grid = ticks(lo, hi).map((y) => [
    s("line", { x1: L, x2: W - R, y1: py(y), y2: py(y), class: "grid" }),
    s("text", { x: L - 4, y: py(y) + 4, "text-anchor": "end", class: "tick" }, format(y)),
  ]);
  const xt = [...new Set([x0, Math.round((x0 + x1) / 2), x1])].map((x) =>
    s("text", { x: px(x), y: H - B + 16, "text-anchor": "middle", class: "tick" }, String(x)));
  const lines = series.map((d) => {
    const pts = xs.map((x, i) => [x, d.ys[i]]).filter(([, y]) => y !== null && y !== undefined && Number.isFinite(y));
    return s("g", { class: "series" },
      s("polyline", { points: pts.map(([x, y]) => `${px(x)},${py(y)}`).join(" "), fill: "none", stroke: d.color || TABLEAU[0], "stroke-width": 2 }),
      pts.map(([x, y]) => s("circle", { cx: px(x), cy: py(y), r: 2.5, fill: d.color || TABLEAU[0] },
        s("title", {}, `${d.name}, ${xLabel} ${x}: ${format(y)}`))));
  });
  const label = `${title}: ${series.map((d) => `${d.name} from ${format(d.ys[0])} to ${format(d.ys[d.ys.length - 1])}`).join("; ")}`;
  return h("figure", { class: "chart" },
    s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label },
      grid, xt,
      s("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }),
      s("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", class: "axis-label" }, xLabel),
      lines),
    h("figcaption", {}, title, series.length > 1 ? series.map((d) => h("span", { class: "key" },
      s("svg", { width: 10, height: 10, "aria-hidden": "true" }, s("rect", { width: 10, height: 10, fill: d.color || TABLEAU[0] })),
      ` ${d.name}`)) : null));
}

// A confusion matrix: rows are true classes, columns predictions; colour = share of the row.
export function heatmap({ classes, matrix }) {
  const C = classes.length;
  const cell = Math.max(14, Math.min(40, Math.floor(360 / C)));
  const lab = Math.min(110, 12 + 7 * Math.max(...classes.map((c) => c.length)));
  const W = lab + C * cell + 8, H = lab + C * cell + 8;
  const cells = [];
  matrix.forEach((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    row.forEach((v, j) => {
      const share = v / total;
      const light = Math.round(97 - share * 62);
      cells.push(s("rect", { x: lab + j * cell, y: lab + i * cell, width: cell - 1, height: cell - 1,
        fill: `hsl(${i === j ? 210 : 12}, 70%, ${light}%)`, class: "cell", "data-true": classes[i], "data-pred": classes[j] },
        s("title", {}, `true ${classes[i]}, predicted ${classes[j]}: ${v}`)));
      if (cell >= 18 && v) {
        cells.push(s("text", { x: lab + j * cell + cell / 2, y: lab + i * cell + cell / 2 + 4, "text-anchor": "middle",
          class: light < 60 ? "count light" : "count" }, String(v)));
      }
    });
  });
  const names = classes.map((c, i) => [
    s("text", { x: lab - 4, y: lab + i * cell + cell / 2 + 4, "text-anchor": "end", class: "tick cls-row" }, c),
    s("text", { x: 0, y: 0, "text-anchor": "start", class: "tick cls-col",
      transform: `translate(${lab + i * cell + cell / 2 + 4}, ${lab - 4}) rotate(-90)` }, c),
  ]);
  return h("figure", { class: "chart heatmap" },
    s("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
      "aria-label": `Confusion matrix over ${C} classes; rows are the true class, columns the prediction` },
      s("text", { x: 2, y: 12, class: "axis-label" }, "true ↓ / predicted →"), names, cells),
    h("figcaption", {}, "Confusion matrix (validation)"));
}

// Horizontal bars with a value in [0, 1] each: per-class accuracy or top-k scores.
export function bars({ items, caption, format = (v) => `${(100 * v).toFixed(1)}%` }) {
  const W = 360, row = 20, lab = Math.min(120, 14 + 7 * Math.max(1, ...items.map((d) => String(d.label).length)));
  const H = items.length * row + 4;
  const g = items.map((d, i) => s("g", { class: "bar" },
    s("text", { x: lab - 6, y: i * row + 14, "text-anchor": "end", class: "tick" }, String(d.label)),
    s("rect", { x: lab, y: i * row + 3, width: W - lab - 56, height: row - 6, class: "track" }),
    s("rect", { x: lab, y: i * row + 3, width: Math.max(0, (W - lab - 56) * (d.value ?? 0)), height: row - 6,
      fill: d.color || TABLEAU[0] }),
    s("text", { x: W - 50, y: i * row + 14, class: "tick value" }, d.value === null || d.value === undefined ? "–" : format(d.value))));
  return h("figure", { class: "chart bars" },
    s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": `${caption}: ${items.map((d) => `${d.label} ${d.value === null ? "none" : format(d.value)}`).join(", ")}` }, g),
    caption ? h("figcaption", {}, caption) : null);
}

// A 2-D embedding coloured by class. xy in [-1, 1].
export function scatter({ xy, labels, classes, title }) {
  const W = 300, P = 8;
  const p = (v) => P + ((v + 1) / 2) * (W - 2 * P);
  const dots = xy.map(([x, y], i) => s("circle", { cx: p(x).toFixed(1), cy: p(-y).toFixed(1), r: 3,
    fill: classColor(labels[i], classes.length), class: "dot" }, s("title", {}, classes[labels[i]])));
  return h("figure", { class: "chart scatter" },
    s("svg", { viewBox: `0 0 ${W} ${W}`, role: "img", "aria-label": `${title}: ${xy.length} validation images coloured by class` },
      s("rect", { x: 0, y: 0, width: W, height: W, class: "frame" }), dots),
    h("figcaption", {}, title));
}

export function legend(classes) {
  return h("ul", { class: "legend", "aria-label": "Classes" }, classes.map((c, i) => {
    const sw = s("svg", { width: 12, height: 12, "aria-hidden": "true" }, s("rect", { width: 12, height: 12, fill: classColor(i, classes.length) }));
    return h("li", {}, sw, " ", c);
  }));
}
