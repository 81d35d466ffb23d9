// Server: backbone facts, readiness, and from /metrics the bank, queue, jobs and batch sizes.
import { api, backbone, getMetricsToken, setMetricsToken, toError } from "./api.js";
import { h, fmtBytes, fmtNum, errorBox } from "./dom.js";
import { bars } from "./charts.js";

// Prometheus text -> [{name, labels, value}]
export function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

function dl(id, pairs) {
  return h("dl", { class: "facts", id }, pairs.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function metricsView(samples) {
  const one = (name) => samples.find((x) => x.name === name)?.value;
  const buckets = samples.filter((x) => x.name === "vpt_batch_images_bucket").map((x) => [x.labels.le, x.value]);
  const count = one("vpt_batch_images_count") || 0;
  const items = buckets.map(([le, cum], i) => ({ label: le === "+Inf" ? `> ${Number(buckets[i - 1]?.[0] ?? 0)}` : `≤ ${Number(le)}`,
    value: count ? (cum - (i ? buckets[i - 1][1] : 0)) / count : 0 }));
  const jobs = samples.filter((x) => x.name === "vpt_jobs").map((x) => `${x.labels.state} ${x.value}`).join(", ") || "–";
  return h("div", { id: "server-metrics" },
    h("h2", {}, "Bank and queue"),
    dl("bank-facts", [
      ["Resident tasks", fmtNum(one("vpt_bank_resident_tasks"))], ["Resident bytes", fmtBytes(one("vpt_bank_resident_bytes"))],
      ["Hits / misses", `${fmtNum(one("vpt_bank_hits"))} / ${fmtNum(one("vpt_bank_misses"))}`], ["Evictions", fmtNum(one("vpt_bank_evictions"))],
      ["Images waiting", fmtNum(one("vpt_queue_images"))], ["Training jobs", jobs],
      ["Batches", fmtNum(count)], ["Mean batch", count ? fmtNum(one("vpt_batch_images_sum") / count) : "–"]]),
    h("h2", {}, "Batch sizes"),
    count ? bars({ items, caption: `Share of ${count} forward batches by images per batch` }) : h("p", { class: "muted" }, "No batch has run yet."));
}

async function loadMetrics(box, signal) {
  const token = getMetricsToken();
  const res = await fetch("/metrics", { headers: token ? { Authorization: `Bearer ${token}` } : {}, signal });
  if (res.ok) { box.replaceChildren(metricsView(parseMetrics(await res.text()))); return; }
  const err = await toError(res);
  const input = h("input", { id: "metrics-token", type: "password", autocomplete: "off" });
  const form = h("form", { class: "row" }, h("label", { for: "metrics-token" }, "Metrics token"), input, h("button", { type: "submit" }, "Show metrics"));
  form.addEventListener("submit", (e) => { e.preventDefault(); setMetricsToken(input.value.trim()); loadMetrics(box, signal); });
  box.replaceChildren(h("h2", {}, "Bank and queue"), errorBox(err),
    h("p", {}, "/metrics names every tenant and task, so it answers only loopback callers, or callers with the server's metrics token (VPT_METRICS_TOKEN) rather than an API key. Enter that token to see bank, queue and batch figures."),
    form);
}

export async function serverPage(el, signal) {
  const bb = await backbone();
  let ready;
  try { ready = await api("/readyz", { signal }); } catch (err) { ready = { status: err.message, checks: {} }; }
  const box = h("div", {}, h("p", {}, "Loading metrics…"));
  el.replaceChildren(h("h1", {}, "Server"),
    h("h2", {}, "Backbone"),
    dl("backbone-facts", [["Name", bb.name], ["Fingerprint", h("code", {}, bb.fingerprint)],
      ["Input size", bb.input_size.join(" × ")], ["Embedding", `${bb.embed_dim} wide, ${bb.depth} blocks, ${bb.num_heads} heads`],
      ["Dtype", bb.dtype], ["Device", bb.device]]),
    h("h2", {}, "Readiness"),
    dl("ready-facts", [["Status", ready.status], ...Object.entries(ready.checks || {}).map(([k, v]) => [k, v])]),
    box);
  try { await loadMetrics(box, signal); } catch (err) { if (err.name !== "AbortError") box.replaceChildren(errorBox(err)); }
}
