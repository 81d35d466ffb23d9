// Tasks: every task of the tenant with its current version's facts; search and sort.
import { api, backbone } from "./api.js";
import { h, fmtPct, fmtBytes, fmtTime } from "./dom.js";

const COLUMNS = [
  ["task_id", "Task", (t) => t.task_id],
  ["method", "Method", (t) => t.method],
  ["classes", "Classes", (t) => t.classes.length],
  ["current_version", "Version", (t) => t.current_version],
  ["val_accuracy", "Val accuracy", (t) => t.metrics?.val_accuracy ?? -1],
  ["size_bytes", "Bytes", (t) => t.size_bytes],
  ["updated_at", "Last trained", (t) => t.updated_at],
  ["servable", "Servable", (t) => (t.servable ? 1 : 0)],
];

async function loadTasks(signal) {
  const out = [];
  let cursor = null;
  do { // follows pagination when the server pages the list
    const q = cursor ? `?cursor=${encodeURIComponent(cursor)}` : "";
    const body = await api(`/tasks${q}`, { signal });
    out.push(...body.tasks);
    cursor = body.next_cursor || null;
  } while (cursor);
  // a slim listing gives no metrics or classes: read those from each task
  return Promise.all(out.map((t) => (t.metrics === undefined || t.classes === undefined
    ? api(`/tasks/${encodeURIComponent(t.task_id)}`, { signal }) : t)));
}

export async function tasksPage(el, signal) {
  const [tasks, bb] = await Promise.all([loadTasks(signal), backbone()]);
  for (const t of tasks) t.servable = t.servable ?? t.backbone_fingerprint === bb.fingerprint; // the server's word first
  let sortKey = "updated_at", desc = true, query = "";
  const tbody = h("tbody");
  const count = h("p", { class: "muted", "aria-live": "polite" });
  const headRow = h("tr");
  const search = h("input", { id: "task-search", type: "search", placeholder: "id, method or class" });

  function draw() {
    const q = query.toLowerCase();
    const get = COLUMNS.find((c) => c[0] === sortKey)[2];
    const rows = tasks.filter((t) => !q || t.task_id.toLowerCase().includes(q) || t.method.toLowerCase().includes(q)
      || t.classes.some((c) => c.toLowerCase().includes(q)));
    rows.sort((a, b) => { const x = get(a), y = get(b); return (x < y ? -1 : x > y ? 1 : 0) * (desc ? -1 : 1); });
    tbody.replaceChildren(...rows.map((t) => h("tr", {},
      h("td", {}, h("a", { href: `#/task/${encodeURIComponent(t.task_id)}` }, t.task_id)),
      h("td", {}, t.method),
      h("td", { title: t.classes.join(", ") }, `${t.classes.length}: ${t.classes.slice(0, 4).join(", ")}${t.classes.length > 4 ? ", …" : ""}`),
      h("td", { class: "num" }, `v${t.current_version}`),
      h("td", { class: "num" }, fmtPct(t.metrics?.val_accuracy)),
      h("td", { class: "num" }, fmtBytes(t.size_bytes)),
      h("td", {}, fmtTime(t.updated_at)),
      h("td", {}, t.servable ? "yes" : h("span", { title: t.reason || "made for another backbone" }, `no (${t.reason || "backbone mismatch"})`)))));
    count.textContent = `${rows.length} of ${tasks.length} tasks`;
    headRow.replaceChildren(...COLUMNS.map(([key, label]) => h("th", { scope: "col", "aria-sort": key === sortKey ? (desc ? "descending" : "ascending") : "none" },
      h("button", { type: "button", class: "sort", onclick: () => { desc = key === sortKey ? !desc : false; sortKey = key; draw(); } },
        label, key === sortKey ? (desc ? " ▼" : " ▲") : ""))));
  }
  search.addEventListener("input", () => { query = search.value; draw(); });
  draw();
  el.replaceChildren(
    h("div", { class: "row between" }, h("h1", {}, "Tasks"), h("a", { class: "button", href: "#/train" }, "Train a task")),
    h("div", { class: "row" }, h("label", { for: "task-search" }, "Search"), search, count),
    tasks.length ? h("table", { class: "data", id: "tasks-table" }, h("caption", { class: "sr-only" }, "Tasks"), h("thead", {}, headRow), tbody)
      : h("p", {}, "No tasks yet. ", h("a", { href: "#/train" }, "Train one"), " or import a task file with the API."));
}
