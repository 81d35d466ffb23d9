// Task: versions side by side, rollback, delete, export, the selected version's charts, try an image.
import { api } from "./api.js";
import { h, fmtPct, fmtBytes, fmtTime, fmtNum, confirmDialog, errorBox } from "./dom.js";
import { lineChart, heatmap, bars, scatter, legend, classColor } from "./charts.js";

const enc = encodeURIComponent;

async function download(path, fallbackName) {
  const res = await api(path, { raw: true });
  const name = (res.headers.get("content-disposition") || "").match(/filename="([^"]+)"/)?.[1] || fallbackName;
  const url = URL.createObjectURL(await res.blob());
  const a = h("a", { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function recipeText(v) {
  const o = v.training?.options;
  if (!o) return "–";
  const parts = [`${o.epochs} epochs`, `batch ${o.batch_size}`, `base lr ${fmtNum(o.base_lr)}`, `wd ${fmtNum(o.weight_decay)}`];
  if (o.sweep && o.sweep !== "none") parts.push(`sweep ${o.sweep}`);
  return parts.join(", ");
}

function compareTable(task, versions, selected, actions) {
  const classes = task.classes;
  const cols = [...versions].reverse();
  const row = (label, cell) => h("tr", {}, h("th", { scope: "row" }, label), cols.map((v) => h("td", {}, cell(v))));
  const perClass = classes.length <= 20
    ? classes.map((c) => row(`· ${c}`, (v) => fmtPct(v.metrics?.per_class_accuracy?.[c])))
    : [row("Worst class", (v) => {
      const pc = Object.entries(v.metrics?.per_class_accuracy || {}).filter(([, a]) => a !== null);
      if (!pc.length) return "–";
      const [c, a] = pc.reduce((m, e) => (e[1] < m[1] ? e : m));
      return `${c}: ${fmtPct(a)}`;
    })];
  return h("div", { class: "scroll" }, h("table", { class: "data compare", id: "versions-table" },
    h("caption", {}, "Versions side by side"),
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Version"), cols.map((v) => h("th", { scope: "col", class: v.version === selected ? "selected" : "" },
      `v${v.version}`, v.current ? h("span", { class: "badge" }, "current") : null)))),
    h("tbody", {},
      row("Created", (v) => fmtTime(v.created_at)),
      row("Method", (v) => `${v.method}${v.num_prompts ? ` (${v.num_prompts} prompts)` : ""}`),
      row("Val accuracy", (v) => fmtPct(v.metrics?.val_accuracy)),
      perClass,
      row("Recipe", recipeText),
      row("Trainable params", (v) => (v.metrics?.trainable_parameters?.total ?? "–").toLocaleString()),
      row("Size", (v) => fmtBytes(v.size_bytes)),
      row("", (v) => h("div", { class: "actions" },
        h("button", { type: "button", "aria-pressed": String(v.version === selected), onclick: () => actions.select(v.version) }, `Show v${v.version}`),
        v.current ? null : h("button", { type: "button", onclick: () => actions.activate(v.version) }, `Activate v${v.version}`),
        h("button", { type: "button", onclick: () => actions.exportVersion(v.version) }, "Export"))))));
}

function featureMap(fm) {
  if (!fm) return h("p", { class: "muted" }, "No feature map for this version (trained without a validation split, or imported).");
  const sil = (x) => (x === null || x === undefined ? "–" : x.toFixed(3));
  return h("div", {},
    h("div", { class: "row wrap", id: "feature-map" },
      scatter({ xy: fm.linear.xy, labels: fm.labels, classes: fm.classes, title: `Frozen backbone (linear): silhouette ${sil(fm.linear.silhouette)}` }),
      scatter({ xy: fm.task.xy, labels: fm.labels, classes: fm.classes, title: `This task: silhouette ${sil(fm.task.silhouette)}` })),
    legend(fm.classes),
    h("p", { class: "muted" }, `t-SNE of the final CLS features of ${fm.labels.length} validation images. The silhouette score (−1 to 1) is measured on the features: higher means better separated classes.`));
}

function versionDetails(v) {
  const m = v.metrics || {};
  const ep = m.epochs || [];
  const xs = ep.map((e) => e.epoch);
  const curves = ep.length ? h("div", { class: "row wrap", id: "curves" },
    lineChart({ title: "Training loss", xs, series: [{ name: "train loss", ys: ep.map((e) => e.train_loss) },
      { name: "val loss", ys: ep.map((e) => e.val_loss), color: "#f28e2b" }] }),
    lineChart({ title: "Validation accuracy", xs, yMin: 0, yMax: 1, format: (y) => `${Math.round(100 * y)}%`, series: [{ name: "val accuracy", ys: ep.map((e) => e.val_accuracy), color: "#59a14f" }] }),
    lineChart({ title: "Learning rate", xs, series: [{ name: "lr", ys: ep.map((e) => e.lr), color: "#b07aa1" }] }))
    : h("p", { class: "muted" }, "No training history in this version.");
  const pc = m.per_class_accuracy ? Object.entries(m.per_class_accuracy) : [];
  return h("section", { "aria-labelledby": "details-title", id: "version-details" },
    h("h2", { id: "details-title" }, `Version ${v.version}: ${v.method}, val accuracy ${fmtPct(m.val_accuracy)}`),
    h("h3", {}, "Training curves"), curves,
    h("div", { class: "row wrap top" },
      h("div", {}, h("h3", {}, "Confusion matrix"), m.confusion_matrix ? heatmap({ classes: v.classes, matrix: m.confusion_matrix }) : h("p", { class: "muted" }, "–")),
      h("div", {}, h("h3", {}, "Per-class accuracy"), pc.length
        ? bars({ items: pc.map(([c, a], i) => ({ label: c, value: a, color: classColor(i, pc.length) })), caption: "Recall of each class on the validation split" })
        : h("p", { class: "muted" }, "–"))),
    h("h3", {}, "Feature map"), featureMap(m.feature_map));
}

function tryImage(id) {
  const out = h("div", { id: "prediction", class: "prediction", "aria-live": "polite" });
  const input = h("input", { id: "try-file", type: "file", accept: "image/*", class: "sr-only", tabindex: "-1" });
  const zone = h("label", { for: "try-file", class: "dropzone", tabindex: "0" }, "Drop an image here, or press Enter to choose one");
  async function predict(file) {
    out.replaceChildren(h("p", {}, `Classifying ${file.name}…`));
    const form = new FormData();
    form.append("image", file, file.name);
    try {
      const r = await api(`/predict?task=${enc(id)}&top_k=5`, { method: "POST", body: form });
      const res = r.results[0];
      out.replaceChildren(
        h("p", {}, h("strong", {}, res.top_k[0].label), ` — answered by version ${r.version}`, h("span", { class: "muted" }, ` (${fmtNum(r.timings_ms.total)} ms)`)),
        bars({ items: res.top_k.map((t) => ({ label: t.label, value: t.score })), caption: `Top ${res.top_k.length} for ${file.name}` }));
    } catch (err) { out.replaceChildren(errorBox(err)); }
  }
  input.addEventListener("change", () => input.files[0] && predict(input.files[0]));
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    const f = e.dataTransfer.files[0];
    if (f) predict(f);
  });
  return h("section", { "aria-labelledby": "try-title" }, h("h2", { id: "try-title" }, "Try an image"), input, zone, out);
}

export async function taskPage(el, signal, id) {
  const [task, { versions }] = await Promise.all([api(`/tasks/${enc(id)}`, { signal }), api(`/tasks/${enc(id)}/versions`, { signal })]);
  let selected = task.current_version;
  const status = h("div", { id: "task-status", "aria-live": "polite" });
  const table = h("div");
  const details = h("div");
  const actions = {
    select: async (n) => { selected = n; drawTable(); await drawDetails(); },
    activate: async (n) => {
      if (!(await confirmDialog(`Activate version ${n}?`, `Task ${id} will answer with version ${n} from its next batch. You can switch back at any time.`, `Activate v${n}`))) return;
      try {
        await api(`/tasks/${enc(id)}/versions/${n}/activate`, { method: "POST" });
        await taskPage(el, signal, id);
        document.getElementById("task-status").replaceChildren(h("p", { class: "ok" }, `Version ${n} is now current.`));
      } catch (err) { status.replaceChildren(errorBox(err)); }
    },
    exportVersion: (n) => download(`/tasks/${enc(id)}/export?version=${n}`, `${id}-v${n}.safetensors`).catch((err) => status.replaceChildren(errorBox(err))),
  };
  function drawTable() { table.replaceChildren(compareTable(task, versions, selected, actions)); }
  async function drawDetails() {
    details.replaceChildren(h("p", {}, "Loading version…"));
    try { details.replaceChildren(versionDetails(await api(`/tasks/${enc(id)}/versions/${selected}`, { signal }))); } catch (err) {
      if (err.name !== "AbortError") details.replaceChildren(errorBox(err));
    }
  }
  async function remove() {
    if (!(await confirmDialog(`Delete task ${id}?`, `Every version of ${id} is deleted and a running training job of it is cancelled. This cannot be undone.`, "Delete task"))) return;
    try { await api(`/tasks/${enc(id)}`, { method: "DELETE" }); location.hash = "#/tasks"; } catch (err) { status.replaceChildren(errorBox(err)); }
  }
  drawTable();
  el.replaceChildren(
    h("div", { class: "row between" }, h("h1", {}, `Task ${id}`), h("div", { class: "actions" },
      h("a", { class: "button", href: `#/train?task=${enc(id)}` }, "Train again"),
      h("button", { type: "button", onclick: () => actions.exportVersion(task.current_version) }, "Export current"),
      h("button", { type: "button", class: "danger", onclick: remove }, "Delete task"))),
    h("p", { class: "muted" }, `Current version v${task.current_version} of ${task.num_versions}; ${task.method}; ${task.classes.length} classes: ${task.classes.join(", ")}; backbone ${task.backbone}.`),
    status, table, tryImage(id), details);
  await drawDetails();
}
