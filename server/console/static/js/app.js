// The console's router: `#/tasks`, `#/task/<id>`, `#/train`, `#/jobs`, `#/job/<id>`, `#/server`, `#/login`.
import { api, getKey, setKey } from "./api.js";
import { h, errorBox } from "./dom.js";
import { tasksPage } from "./tasks.js";
import { taskPage } from "./task.js";
import { trainPage } from "./train.js";
import { jobsPage, jobPage } from "./jobs.js";
import { serverPage } from "./server.js";

const main = document.getElementById("main");
let dispose = null;

const ROUTES = [
  [/^#\/tasks$/, () => tasksPage],
  [/^#\/task\/([^/]+)$/, (m) => (el, signal) => taskPage(el, signal, decodeURIComponent(m[1]))],
  [/^#\/train(\?.*)?$/, () => trainPage],
  [/^#\/jobs$/, () => jobsPage],
  [/^#\/job\/([^/]+)$/, (m) => (el, signal) => jobPage(el, signal, decodeURIComponent(m[1]))],
  [/^#\/server$/, () => serverPage],
  [/^#\/login$/, () => loginPage],
];

function loginPage(el) {
  const input = h("input", { id: "api-key", type: "password", autocomplete: "off", required: true, spellcheck: "false" });
  const msg = h("p", { class: "error", role: "alert", hidden: true });
  const form = h("form", { class: "login", "aria-labelledby": "login-title" },
    h("h1", { id: "login-title" }, "Log in"),
    h("p", {}, "This server needs an API key. It is kept in this tab only (session storage) and sent as a bearer token."),
    h("label", { for: "api-key" }, "API key"), input,
    h("button", { type: "submit" }, "Log in"), msg);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    setKey(input.value.trim());
    try {
      await api("/tasks");
      location.hash = sessionStorage.getItem("vpt-console-after-login") || "#/tasks";
    } catch (err) {
      setKey(null);
      msg.hidden = false;
      msg.textContent = err.message;
    }
  });
  el.replaceChildren(form);
  input.focus();
}

async function render() {
  if (dispose) dispose.abort();
  dispose = new AbortController();
  const hash = location.hash || "#/tasks";
  for (const a of document.querySelectorAll("[data-nav]")) {
    const on = hash.startsWith(`#/${a.dataset.nav}`) || (a.dataset.nav === "tasks" && hash.startsWith("#/task/"))
      || (a.dataset.nav === "jobs" && hash.startsWith("#/job/"));
    if (on) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  document.getElementById("logout").hidden = !getKey();
  const route = ROUTES.find(([re]) => re.test(hash));
  const page = route ? route[1](hash.match(route[0])) : tasksPage;
  main.replaceChildren(h("p", {}, "Loading…"));
  try {
    await page(main, dispose.signal);
  } catch (err) {
    if (err.name === "AbortError") return;
    main.replaceChildren(h("h1", {}, "Something went wrong"), errorBox(err));
  }
  if (location.hash !== "#/login" && !main.contains(document.activeElement)) main.focus({ preventScroll: true });
}

window.addEventListener("vpt-unauthorized", () => {
  if (location.hash === "#/login") return;
  sessionStorage.setItem("vpt-console-after-login", location.hash || "#/tasks");
  setKey(null);
  location.hash = "#/login";
});
window.addEventListener("hashchange", render);
document.getElementById("logout").addEventListener("click", () => {
  setKey(null);
  location.hash = "#/login";
});
render();
