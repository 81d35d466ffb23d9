// The JSON API with the tab's API key. The key lives in sessionStorage only: never in a URL or cookie.
const KEY = "vpt-console-key";
const METRICS_TOKEN = "vpt-console-metrics-token";

export const getKey = () => sessionStorage.getItem(KEY);
export const setKey = (k) => (k ? sessionStorage.setItem(KEY, k) : sessionStorage.removeItem(KEY));
export const getMetricsToken = () => sessionStorage.getItem(METRICS_TOKEN);
export const setMetricsToken = (k) => (k ? sessionStorage.setItem(METRICS_TOKEN, k) : sessionStorage.removeItem(METRICS_TOKEN));

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// The server's `{"error": {"code", "message"}}` as an ApiError (its message shown as is).
export async function toError(res) {
  let code = `http_${res.status}`, message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    if (body && body.error) {
      code = body.error.code || code;
      message = typeof body.error === "string" ? body.error : body.error.message || message;
    }
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(res.status, code, `${message} (${code})`);
}

export async function api(path, { method = "GET", body, headers = {}, signal, raw = false } = {}) {
  let res;
  try {
    res = await fetch(path, { method, body, headers: authHeaders(headers), signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network", `the server did not answer: ${e.message}`);
  }
  if (!res.ok) {
    const err = await toError(res);
    if (res.status === 401) window.dispatchEvent(new CustomEvent("vpt-unauthorized", { detail: err }));
    throw err;
  }
  if (raw) return res;
  return res.status === 204 ? null : res.json();
}

// Server-sent events read with fetch (EventSource cannot send the Authorization header).
// Calls onEvent(name, data) per event; returns when the stream ends.
export async function streamEvents(path, onEvent, signal) {
  const res = await api(path, { headers: { Accept: "text/event-stream" }, signal, raw: true });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // comments are keep-alives
        const i = line.indexOf(":");
        const field = i < 0 ? line : line.slice(0, i);
        const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
        if (field === "event") name = val;
        else if (field === "data") data.push(val);
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

// A multipart upload with progress (fetch cannot report upload progress): resolves the JSON body.
export function upload(path, form, onProgress, signal) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    xhr.responseType = "json";
    xhr.upload.addEventListener("progress", (e) => onProgress(e.loaded, e.lengthComputable ? e.total : null));
    xhr.addEventListener("load", () => {
      const body = xhr.response;
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else {
        const err = body && body.error ? body.error : { code: `http_${xhr.status}`, message: `${xhr.status} ${xhr.statusText}` };
        reject(new ApiError(xhr.status, err.code, `${err.message} (${err.code})`));
      }
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, "network", "the upload failed: the server did not answer")));
    xhr.addEventListener("abort", () => reject(new ApiError(0, "aborted", "the upload was cancelled")));
    if (signal) signal.addEventListener("abort", () => xhr.abort());
    xhr.send(form);
  });
}

let backboneCache = null;
export async function backbone() {
  if (!backboneCache) backboneCache = api("/backbone").catch((e) => { backboneCache = null; throw e; });
  return backboneCache;
}
