// Shared helpers of the pages: DOM building (text only), the API key prompt, authorised API
// calls, the connection badge and relative times.
//
// Rule of this UI: message content is only ever inserted as text (textContent / text nodes).
// Nothing here or in the pages assigns innerHTML.

import { Tidings } from "/tidings.js";

const KEY_STORAGE = "tidings.key";

/**
 * Makes an element. `props`: `class`, `text`, `href` (http/https/relative only), `title`,
 * `dataset`, `hidden`, `on` ({event: fn}), any other attribute (as text). Children: nodes or
 * strings (strings become text nodes).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else if (key === "href") {
      const safe = safeHref(value);
      if (safe) node.setAttribute("href", safe);
    } else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "hidden") node.hidden = true;
    else if (key === "on") for (const [event, fn] of Object.entries(value)) node.addEventListener(event, fn);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** A link target only if it is http(s) or a path on this site; anything else (javascript:…) → null. */
export function safeHref(value) {
  if (typeof value !== "string" || value === "") return null;
  if (value.startsWith("/") && !value.startsWith("//")) return value;
  try {
    const url = new URL(value);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

/** The path of a channel's page. */
export function channelHref(name) {
  return `/channels/${name.split(":").map(encodeURIComponent).join(":")}`;
}

export function runHref(id) {
  return `/runs/${encodeURIComponent(id)}`;
}

// ---- API key ------------------------------------------------------------------------------

export function getKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || null;
  } catch {
    return null;
  }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    /* storage disabled: the key lives for this page only */
  }
  memoryKey = key || null;
  for (const fn of keyListeners) fn(memoryKey);
}

let memoryKey = null;
const keyListeners = new Set();
let asking = null;
let declined = false;

/** Calls `fn(key)` whenever the key changes. */
export function onKeyChange(fn) {
  keyListeners.add(fn);
}

function currentKey() {
  return getKey() ?? memoryKey;
}

/**
 * Asks the person for an API key in a small dialog; resolves with it (stored in localStorage),
 * or null when they cancel. `force`: ask even if they declined before.
 */
export function askKey(reason = "", { force = false } = {}) {
  if (asking) return asking;
  if (declined && !force) return Promise.resolve(null);
  asking = new Promise((resolve) => {
    const input = el("input", {
      type: "password",
      name: "key",
      autocomplete: "off",
      spellcheck: "false",
      required: true,
      id: "key-input",
    });
    const form = el(
      "form",
      { method: "dialog", class: "key-form" },
      el("h2", { text: "API key needed" }),
      el("p", { class: "muted", text: reason || "This action needs an API key of this hub." }),
      el("label", { for: "key-input", text: "API key" }),
      input,
      el(
        "div",
        { class: "actions" },
        el("button", { type: "submit", value: "save", class: "primary", text: "Save and retry" }),
        el("button", { type: "button", value: "cancel", text: "Cancel", on: { click: () => dialog.close("cancel") } }),
        currentKey()
          ? el("button", {
              type: "button",
              class: "link",
              text: "Forget the stored key",
              on: {
                click: () => {
                  storeKey(null);
                  dialog.close("cancel");
                },
              },
            })
          : null,
      ),
      el("p", { class: "muted small", text: "Kept in this browser (localStorage) and sent as Authorization: Bearer." }),
    );
    const dialog = el("dialog", { class: "key-dialog", "aria-labelledby": "key-title" }, form);
    form.querySelector("h2").id = "key-title";
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      dialog.close("save");
    });
    dialog.addEventListener("close", () => {
      const key = dialog.returnValue === "save" ? input.value.trim() : "";
      dialog.remove();
      asking = null;
      if (key) {
        declined = false;
        storeKey(key);
        resolve(key);
      } else {
        declined = true;
        resolve(null);
      }
    });
    document.body.append(dialog);
    dialog.showModal();
    input.focus();
  });
  return asking;
}

export class ApiError extends Error {
  constructor(status, code, message, body) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

/**
 * Calls the hub's API. On 401/403 it asks for an API key (unless `prompt: false`) and retries
 * with `Authorization: Bearer`. Resolves with `{status, data}`; rejects with an ApiError.
 */
export async function api(method, path, body = undefined, { prompt = true } = {}) {
  for (let tries = 0; ; tries++) {
    const headers = {};
    const key = currentKey();
    if (key) headers.authorization = `Bearer ${key}`;
    if (body !== undefined) headers["content-type"] = "application/json";
    let response;
    try {
      response = await fetch(path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        cache: "no-store",
      });
    } catch (error) {
      throw new ApiError(0, "unreachable", `the hub is unreachable (${error.message})`, null);
    }
    let data = null;
    try {
      data = await response.json();
    } catch {
      /* not JSON */
    }
    if ((response.status === 401 || response.status === 403) && prompt && tries < 5) {
      const fresh = await askKey(data?.error?.message);
      if (fresh) continue;
    }
    if (!response.ok) {
      throw new ApiError(response.status, data?.error?.code, data?.error?.message, data);
    }
    return { status: response.status, data };
  }
}

// ---- The live connection ------------------------------------------------------------------

/**
 * The page's hub client. `?transport=sse` (or `ws`, `longpoll`, a comma list) in the page URL
 * forces transports — for testing and for networks that break WebSockets.
 */
export function connect() {
  const params = new URLSearchParams(location.search);
  const forced = params.get("transport");
  const hub = new Tidings(location.origin, {
    token: currentKey(),
    transports: forced ? forced.split(",") : undefined,
  });
  onKeyChange((key) => hub.setToken(key));
  const badge = document.getElementById("conn");
  const show = (state) => {
    if (!badge) return;
    badge.textContent = state === "live" && hub.transport ? `live · ${hub.transport}` : state;
    badge.dataset.state = state;
    badge.title = `Connection: ${state}${hub.transport ? ` (${hub.transport})` : ""}`;
  };
  show(hub.state);
  hub.on("state", show);
  // Refused subscriptions: ask for a key, which reconnects with it.
  hub.on("error", (error) => {
    if (error.code === "forbidden" || error.code === "unauthorized" || error.status === 401 || error.status === 403) {
      askKey(error.message);
    }
  });
  window.tidings = hub; // handy in the console
  const keyButton = document.getElementById("key-button");
  keyButton?.addEventListener("click", () => askKey("", { force: true }));
  return hub;
}

// ---- Notices and times --------------------------------------------------------------------

/** Shows `text` in the page's #notice (role=alert); empty hides it. */
export function notice(text, kind = "error") {
  const box = document.getElementById("notice");
  if (!box) return;
  box.textContent = text || "";
  box.dataset.kind = kind;
  box.hidden = !text;
}

export function relativeTime(iso, now = Date.now()) {
  if (!iso) return "—";
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return "—";
  const s = Math.round((now - t) / 1000);
  const future = s < 0;
  const a = Math.abs(s);
  let text;
  if (a < 5) return "just now";
  if (a < 60) text = `${a}s`;
  else if (a < 3600) text = `${Math.floor(a / 60)}m`;
  else if (a < 86400) text = `${Math.floor(a / 3600)}h`;
  else if (a < 86400 * 30) text = `${Math.floor(a / 86400)}d`;
  else return new Date(t).toISOString().slice(0, 10);
  return future ? `in ${text}` : `${text} ago`;
}

/** A <time> that shows a relative time and keeps it current. */
export function timeEl(iso) {
  if (!iso) return el("span", { class: "muted", text: "—" });
  return el("time", { datetime: iso, title: iso, "data-rel": "1", text: relativeTime(iso) });
}

/** Duration in a short human form: 950 ms, 12.3 s, 4m 05s, 2h 03m. */
export function duration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return "—";
  if (ms < 1000) return `${Math.max(0, Math.round(ms))} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

setInterval(() => {
  const now = Date.now();
  for (const t of document.querySelectorAll("time[data-rel]")) t.textContent = relativeTime(t.dateTime, now);
}, 10000);

/** A status pill (run or feed status). */
export function pill(status) {
  return el("span", { class: `pill pill-${String(status || "none").replace(/[^a-z_]/g, "")}`, text: status || "—" });
}
