// Train: a folder (zipped here) or an archive, options rendered from the server's OpenAPI schema
// of `POST /tasks/{task_id}/train`, upload progress, then the job page.
import { api, upload } from "./api.js";
import { h, fmtBytes, errorBox } from "./dom.js";
import { zipFolder } from "./zip.js";

const TRAIN_PATH = "/tasks/{task_id}/train";

function resolve(schema, doc, depth = 0) {
  if (!schema || depth > 8) return schema || {};
  if (schema.$ref) {
    const target = schema.$ref.replace(/^#\//, "").split("/").reduce((o, k) => (o ? o[k] : undefined), doc);
    return resolve({ ...target, ...Object.fromEntries(Object.entries(schema).filter(([k]) => k !== "$ref")) }, doc, depth + 1);
  }
  if (schema.allOf) return schema.allOf.reduce((acc, part) => ({ ...acc, ...resolve(part, doc, depth + 1) }), { ...schema, allOf: undefined });
  const alt = schema.anyOf || schema.oneOf;
  if (alt) { // Optional[X] is anyOf [X, null]: take X, keep this level's title/description/default
    const picked = alt.map((a) => resolve(a, doc, depth + 1)).find((a) => a.type !== "null") || {};
    const { anyOf, oneOf, ...rest } = schema;
    return { ...picked, ...rest };
  }
  return schema;
}

// The options' properties, from /openapi.json (never a copy kept here, so the form cannot drift).
export async function trainOptionsSchema(signal) {
  const doc = await api("/openapi.json", { signal });
  const op = doc.paths?.[TRAIN_PATH]?.post;
  const content = op?.requestBody?.content?.["multipart/form-data"];
  if (!content) throw new Error("the server's OpenAPI document does not describe POST /tasks/{task_id}/train as multipart");
  const schema = resolve(content.schema, doc);
  const props = {};
  for (const [name, p] of Object.entries(schema.properties || {})) {
    const r = resolve(p, doc);
    if (r.format === "binary" || r.type === "array") continue;
    props[name] = r;
  }
  return { props, required: new Set(schema.required || []) };
}

function field(name, p) {
  const id = `opt-${name}`;
  const label = p.title || name.replace(/_/g, " ");
  const help = p.description ? h("small", { id: `${id}-help`, class: "muted" }, p.description) : null;
  const common = { id, name, "aria-describedby": help ? `${id}-help` : null };
  let input;
  if (p.enum) {
    input = h("select", common, (p.default === undefined ? [h("option", { value: "" }, "(server default)")] : []),
      p.enum.map((v) => h("option", { value: String(v), selected: v === p.default }, String(v))));
  } else if (p.type === "boolean") {
    input = h("input", { ...common, type: "checkbox", checked: p.default === true });
  } else if (p.type === "integer" || p.type === "number") {
    input = h("input", { ...common, type: "number", step: p.type === "integer" ? "1" : "any", min: p.minimum ?? p.exclusiveMinimum,
      max: p.maximum ?? p.exclusiveMaximum, placeholder: p.default === undefined ? "server default" : "", value: p.default ?? "" });
  } else if (Array.isArray(p.examples)) {  // free text (e.g. method combinations) with the usual choices offered
    input = h("input", { ...common, type: "text", list: `${id}-choices`, value: p.default ?? "" });
    const choices = h("datalist", { id: `${id}-choices` }, p.examples.map((v) => h("option", { value: String(v) }, String(v))));
    return h("div", { class: "field" }, h("label", { for: id }, label), input, choices, help);
  } else {
    input = h("input", { ...common, type: "text", placeholder: p.default === undefined ? "server default" : "", value: p.default ?? "" });
  }
  return h("div", { class: "field" }, h("label", { for: id }, label), input, help);
}

function collect(form, props) {
  const out = {};
  for (const [name, p] of Object.entries(props)) {
    const el = form.elements.namedItem(name);
    if (!el) continue;
    const value = p.type === "boolean" ? String(el.checked) : el.value.trim();
    const def = p.default === undefined ? "" : String(p.default);
    if (value !== "" && value !== def) out[name] = value; // unchanged defaults stay the server's
  }
  return out;
}

export async function trainPage(el, signal) {
  const { props } = await trainOptionsSchema(signal);
  const preset = new URLSearchParams(location.hash.split("?")[1] || "").get("task") || "";
  const taskInput = h("input", { id: "task-id", name: "task_id", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}", value: preset,
    "aria-describedby": "task-id-help", autocomplete: "off" });
  const folderInput = h("input", { id: "dataset-folder", type: "file", webkitdirectory: true, multiple: true });
  const archiveInput = h("input", { id: "dataset-archive", type: "file", accept: ".zip,.tar,.tar.gz,.tgz,application/zip,application/x-tar,application/gzip" });
  const picked = h("p", { class: "muted", id: "dataset-picked", "aria-live": "polite" }, "No dataset chosen.");
  const progress = h("progress", { id: "upload-progress", max: 1, value: 0 });
  const progressText = h("span", { id: "upload-text", class: "muted" }, "");
  const status = h("div", { "aria-live": "polite" });
  const submit = h("button", { type: "submit" }, "Upload and train");
  let dataset = null; // {kind: "folder", files} | {kind: "archive", file}

  folderInput.addEventListener("change", () => {
    const files = [...folderInput.files].filter((f) => !f.name.startsWith("."));
    dataset = files.length ? { kind: "folder", files } : null;
    archiveInput.value = "";
    const top = files[0]?.webkitRelativePath.split("/")[0];
    picked.textContent = dataset ? `Folder ${top}: ${files.length} files, ${fmtBytes(files.reduce((a, f) => a + f.size, 0))}` : "The folder is empty.";
  });
  archiveInput.addEventListener("change", () => {
    const f = archiveInput.files[0];
    dataset = f ? { kind: "archive", file: f } : null;
    folderInput.value = "";
    picked.textContent = f ? `Archive ${f.name}, ${fmtBytes(f.size)}` : "No dataset chosen.";
  });

  const form = h("form", { id: "train-form", novalidate: true },
    h("div", { class: "field" }, h("label", { for: "task-id" }, "Task id"), taskInput,
      h("small", { id: "task-id-help", class: "muted" }, "Letters, digits, '.', '_' or '-'. An existing task gets a new version.")),
    h("fieldset", {}, h("legend", {}, "Dataset: a folder per class (optionally train/ and val/), or images with manifest.csv"),
      h("div", { class: "field" }, h("label", { for: "dataset-folder" }, "Folder (zipped in the browser)"), folderInput),
      h("div", { class: "field" }, h("label", { for: "dataset-archive" }, "…or an archive (.zip, .tar, .tar.gz)"), archiveInput),
      picked),
    h("fieldset", { id: "train-options" }, h("legend", {}, "Training options"),
      h("div", { class: "grid" }, Object.entries(props).map(([name, p]) => field(name, p)))),
    h("div", { class: "row" }, submit, progress, progressText), status);

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    status.replaceChildren();
    if (!taskInput.checkValidity()) { status.replaceChildren(errorBox("Enter a task id: letters, digits, '.', '_' or '-' (at most 64).")); taskInput.focus(); return; }
    if (!dataset) { status.replaceChildren(errorBox("Choose a folder or an archive.")); folderInput.focus(); return; }
    submit.disabled = true;
    try {
      let blob, name;
      if (dataset.kind === "folder") {
        blob = await zipFolder(dataset.files.map((f) => ({ path: f.webkitRelativePath || f.name, file: f })), (done, total, n) => {
          progress.value = total ? (0.3 * done) / total : 0;
          progressText.textContent = `Zipping: ${n} of ${dataset.files.length} files`;
        }, signal);
        name = "dataset.zip";
      } else { blob = dataset.file; name = dataset.file.name; }
      const body = new FormData();
      for (const [k, v] of Object.entries(collect(form, props))) body.append(k, v);
      body.append("dataset", blob, name);
      const start = dataset.kind === "folder" ? 0.3 : 0;
      const job = await upload(`/tasks/${encodeURIComponent(taskInput.value.trim())}/train`, body, (loaded, total) => {
        progress.value = total ? start + ((1 - start) * loaded) / total : start;
        progressText.textContent = `Uploading: ${fmtBytes(loaded)}${total ? ` of ${fmtBytes(total)}` : ""}`;
      }, signal);
      progress.value = 1;
      progressText.textContent = "Uploaded.";
      location.hash = `#/job/${encodeURIComponent(job.job_id)}`;
    } catch (err) {
      if (err.name === "AbortError") return;
      status.replaceChildren(errorBox(err));
      progressText.textContent = "";
      progress.value = 0;
    } finally { submit.disabled = false; }
  });
  el.replaceChildren(h("h1", {}, "Train a task"), form);
}
