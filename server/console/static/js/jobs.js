// Jobs: a live list, and a job page that follows the job's event stream.
import { api, streamEvents } from "./api.js";
import { h, fmtPct, fmtNum, fmtTime, fmtDuration, confirmDialog, errorBox } from "./dom.js";
import { lineChart } from "./charts.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const enc = encodeURIComponent;
const sleep = (ms, signal) => new Promise((r) => { const t = setTimeout(r, ms); signal.addEventListener("abort", () => { clearTimeout(t); r(); }); });

function stateBadge(state) { return h("span", { class: `state ${state}` }, state); }

export async function jobsPage(el, signal) {
  const tbody = h("tbody");
  const note = h("p", { class: "muted", "aria-live": "polite" });
  el.replaceChildren(h("h1", {}, "Jobs"), note,
    h("table", { class: "data", id: "jobs-table" }, h("caption", { class: "sr-only" }, "Training jobs"),
      h("thead", {}, h("tr", {}, ["Job", "Task", "State", "Progress", "Created", "Version"].map((c) => h("th", { scope: "col" }, c)))), tbody));
  while (!signal.aborted) {
    try {
      const { jobs } = await api("/jobs", { signal });
      jobs.sort((a, b) => b.created_at - a.created_at);
      tbody.replaceChildren(...jobs.map((j) => h("tr", {},
        h("td", {}, h("a", { href: `#/job/${enc(j.job_id)}` }, j.job_id)),
        h("td", {}, h("a", { href: `#/task/${enc(j.task_id)}` }, j.task_id)),
        h("td", {}, stateBadge(j.state)),
        h("td", { class: "num" }, j.state === "running" ? fmtPct(j.progress?.fraction ?? 0) : j.state === "succeeded" ? "100%" : "–"),
        h("td", {}, fmtTime(j.created_at)),
        h("td", { class: "num" }, j.version ? `v${j.version}` : "–"))));
      note.textContent = jobs.length ? `${jobs.length} jobs, refreshed every 2 s` : "No jobs yet.";
    } catch (err) {
      if (err.name === "AbortError") return;
      note.replaceChildren(errorBox(err));
    }
    await sleep(2000, signal);
  }
}

const FIELDS = [
  ["state", "State", (j) => stateBadge(j.state)],
  ["epoch", "Epoch", (j, p) => (p.epoch ? `${p.epoch} / ${p.epochs}` : "–")],
  ["step", "Step", (j, p) => (p.step ? `${p.step} / ${p.steps}` : "–")],
  ["loss", "Loss", (j, p) => fmtNum(p.loss)],
  ["lr", "Learning rate", (j, p) => fmtNum(p.lr)],
  ["val_acc", "Val accuracy", (j, p) => fmtPct(p.val_acc)],
  ["images_per_s", "Images/s", (j, p) => fmtNum(p.images_per_s)],
  ["eta", "ETA", (j, p) => (TERMINAL.has(j.state) ? "–" : fmtDuration(p.eta_s))],
  ["run", "Sweep run / candidate", (j, p) => {
    if (!(p.runs > 1)) return "–";
    return p.method ? `${p.run} / ${p.runs}: method ${p.method}` // method=auto trains each candidate once
      : `${p.run} / ${p.runs} (base lr ${fmtNum(p.base_lr)}, wd ${fmtNum(p.weight_decay)})`;
  }],
];

export async function jobPage(el, signal, id) {
  let job = await api(`/jobs/${enc(id)}`, { signal });
  const cells = Object.fromEntries(FIELDS.map(([k]) => [k, h("dd", { id: `job-${k.replace(/_/g, "-")}` })]));
  const bar = h("progress", { id: "job-progress", max: 1, value: 0, "aria-label": "Job progress" });
  const pct = h("span", { class: "num", id: "job-percent" });
  const outcome = h("div", { id: "job-outcome", "aria-live": "polite" });
  const cancel = h("button", { type: "button", class: "danger", id: "job-cancel" }, "Cancel job");
  const live = h("span", { class: "muted", id: "job-live" }, "");
  const chartBox = h("div", { class: "chart-slot" });
  const losses = []; // (global step fraction, loss) seen live

  const board = h("div", { class: "chart-slot-small" });
  const BOARD_ORDER = ["method", "val_accuracy", "trainable_parameters", "train_time_s", "diverged", "skipped"];
  function drawBoard(rows) { // method=auto: the candidates finished so far
    if (!Array.isArray(rows) || !rows.length) return;
    // every plain column any row has (a skipped candidate's row has nulls and a reason)
    // in a reading order (stored records come back with their keys sorted), then any other column
    const plain = rows.flatMap((r) => Object.keys(r).filter((k) => r[k] === null || typeof r[k] !== "object"));
    const keys = [...new Set([...BOARD_ORDER.filter((k) => plain.includes(k)), ...plain])];
    board.replaceChildren(h("table", { class: "data compare", id: "job-leaderboard" }, h("caption", {}, "Candidates so far"),
      h("thead", {}, h("tr", {}, keys.map((k) => h("th", { scope: "col" }, k.replace(/_/g, " "))))),
      h("tbody", {}, rows.map((r) => h("tr", {}, keys.map((k) => h("td", {}, typeof r[k] === "number" ? fmtNum(r[k]) : String(r[k] ?? "–"))))))));
  }
  function draw() {
    const p = job.progress || {};
    drawBoard(p.leaderboard);
    for (const [k, , f] of FIELDS) cells[k].replaceChildren(f(job, p));
    bar.value = job.state === "succeeded" ? 1 : p.fraction || 0;
    pct.textContent = fmtPct(bar.value);
    cancel.hidden = TERMINAL.has(job.state);
    if (p.loss !== undefined && p.step && (!losses.length || losses[losses.length - 1][0] !== p.fraction)) losses.push([p.fraction, p.loss]);
    if (losses.length >= 2) {
      chartBox.replaceChildren(lineChart({ title: "Loss (live)", xLabel: "% of training", xs: losses.map(([f]) => Math.round(100 * f)),
        series: [{ name: "loss", ys: losses.map(([, l]) => l) }] }));
    }
    if (job.state === "succeeded") {
      outcome.replaceChildren(h("p", { class: "ok" }, `Finished: version ${job.version} of `, h("a", { href: `#/task/${enc(job.task_id)}` }, job.task_id),
        ` with val accuracy ${fmtPct(job.metrics?.val_accuracy)}.`));
    } else if (job.state === "failed") {
      outcome.replaceChildren(errorBox(`The job failed: ${job.error?.message || "no message"} (${job.error?.code || "error"})`));
    } else if (job.state === "cancelled") {
      outcome.replaceChildren(h("p", {}, "The job was cancelled."));
    }
  }
  cancel.addEventListener("click", async () => {
    if (!(await confirmDialog("Cancel this job?", `Training of ${job.task_id} stops at its next step; no version is published.`, "Cancel job"))) return;
    try { job = await api(`/jobs/${enc(id)}/cancel`, { method: "POST" }); draw(); } catch (err) { outcome.replaceChildren(errorBox(err)); }
  });
  el.replaceChildren(
    h("div", { class: "row between" }, h("h1", {}, `Job ${id}`), cancel),
    h("p", {}, "Task ", h("a", { href: `#/task/${enc(job.task_id)}` }, job.task_id), ` · created ${fmtTime(job.created_at)} · `, live),
    h("div", { class: "row" }, bar, pct),
    h("dl", { class: "facts", id: "job-facts" }, FIELDS.map(([k, label]) => [h("dt", {}, label), cells[k]])),
    board, chartBox, outcome);
  draw();
  // follow the stream; reconnect if it closes before the job ends (keep-alive limits, proxies)
  while (!signal.aborted && !TERMINAL.has(job.state)) {
    try {
      live.textContent = "live";
      await streamEvents(`/jobs/${enc(id)}/events`, (name, data) => {
        if (name === "progress") { job = JSON.parse(data); draw(); }
      }, signal);
    } catch (err) {
      if (err.name === "AbortError") return;
      live.textContent = `stream interrupted: ${err.message}; retrying`;
    }
    if (!TERMINAL.has(job.state)) await sleep(1000, signal);
  }
  live.textContent = TERMINAL.has(job.state) ? "finished" : "";
}
