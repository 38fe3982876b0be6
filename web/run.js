// A run's log, live: the whole log so far (subscribed since 0), then each line as it is printed.
// ANSI colours become spans with classes; the text itself is only ever text.

import { parseAnsi } from "/assets/ansi.js";
import { api, channelHref, connect, duration, el, notice, pill, timeEl } from "/assets/ui.js";

const log = document.getElementById("log");
const followButton = document.getElementById("follow");
const cancelButton = document.getElementById("cancel");
const lineCount = document.getElementById("line-count");

const FINAL = new Set(["succeeded", "failed", "timed_out", "cancelled", "interrupted"]);

let id = "";
try {
  id = decodeURIComponent(location.pathname.replace(/^\/runs\//, ""));
} catch {
  id = "";
}

let run = null;
let lines = 0;

// ---- Following the tail ---------------------------------------------------------------------

let follow = true;
let scrollQueued = false;
/** Where we last scrolled the log ourselves; only the reader takes it higher. */
let autoTop = 0;

function atBottom() {
  return log.scrollTop + log.clientHeight >= log.scrollHeight - 24;
}

function scrollToEnd() {
  if (scrollQueued) return;
  scrollQueued = true;
  requestAnimationFrame(() => {
    scrollQueued = false;
    if (!follow) return;
    log.scrollTop = log.scrollHeight;
    autoTop = log.scrollTop;
  });
}

log.addEventListener("scroll", () => {
  // Scrolling up pauses; coming back to the end resumes. Our own scrolls (whose events may
  // arrive after more lines were added) never pause.
  if (atBottom()) follow = true;
  else if (log.scrollTop < autoTop - 2) follow = false;
  followButton.hidden = follow;
  if (follow && !atBottom()) scrollToEnd();
});

followButton.addEventListener("click", () => {
  follow = true;
  followButton.hidden = true;
  log.scrollTop = log.scrollHeight;
  autoTop = log.scrollTop;
  log.focus();
});

// ---- Lines ----------------------------------------------------------------------------------

const carry = { stdout: null, stderr: null };

function appendLine(message) {
  const d = message.data && typeof message.data === "object" ? message.data : {};
  const div = el("div", { class: "line", dataset: { seq: message.seq } });
  if (message.event === "line") {
    const stream = d.stream === "stderr" ? "stderr" : "stdout";
    if (stream === "stderr") div.classList.add("stderr");
    const { segments, style } = parseAnsi(typeof d.line === "string" ? d.line : "", carry[stream]);
    carry[stream] = style;
    for (const seg of segments) {
      if (seg.classes.length === 0 && Object.keys(seg.css).length === 0) {
        div.append(document.createTextNode(seg.text));
        continue;
      }
      const span = el("span", { class: seg.classes.join(" ") || null });
      span.textContent = seg.text;
      if (seg.css.color) span.style.color = seg.css.color;
      if (seg.css.backgroundColor) span.style.backgroundColor = seg.css.backgroundColor;
      div.append(span);
    }
    if (segments.length === 0) div.append(document.createTextNode(""));
  } else if (message.event === "exit") {
    div.classList.add("other", "exit");
    const how = d.signal ? `killed by ${d.signal}` : `exit code ${d.exit_code ?? "—"}`;
    div.append(el("span", { class: "event", text: "■" }), ` ${d.status ?? "finished"} (${how})`);
  } else {
    // Anything else a job published to its channel: shown, plainly, as event + JSON.
    div.classList.add("other");
    let json;
    try {
      json = JSON.stringify(message.data);
    } catch {
      json = String(message.data);
    }
    div.append(el("span", { class: "event", text: message.event }), " ", json);
  }
  log.append(div);
  if (!div.classList.contains("other")) lines += 1;
  lineCount.textContent = `${lines} line${lines === 1 ? "" : "s"}`;
  if (follow) scrollToEnd();
}

// ---- The run record -------------------------------------------------------------------------

function showRun(next) {
  if (!next || next.id !== id) return;
  // Keep the most advanced state: a late answer must not undo a final one.
  if (run && FINAL.has(run.status) && !FINAL.has(next.status)) return;
  run = next;
  document.getElementById("job-name").textContent = run.job;
  document.getElementById("crumb-job").textContent = run.job;
  document.getElementById("run-id").textContent = run.id;
  document.title = `${run.job} · ${run.status} · Tidings`;
  document.getElementById("status").replaceChildren(pill(run.status));
  const exit = document.getElementById("exit-code");
  if (run.exit_code !== null && run.exit_code !== undefined) exit.textContent = String(run.exit_code);
  else if (run.signal) exit.textContent = run.signal;
  else exit.textContent = "—";
  document.getElementById("started").replaceChildren(timeEl(run.started || run.created));
  document.getElementById("trigger").textContent = `${run.trigger}${run.attempt > 1 ? ` · attempt ${run.attempt}` : ""}`;
  const params = Object.entries(run.params || {});
  document
    .getElementById("params")
    .replaceChildren(params.length ? params.map(([k, v]) => `${k}=${v}`).join(", ") : "—");
  const link = document.getElementById("raw-link");
  link.href = channelHref(run.channel);
  cancelButton.disabled = FINAL.has(run.status);
  if (run.error && FINAL.has(run.status)) notice(run.error, "info");
  tick();
}

function tick() {
  if (!run) return;
  const start = Date.parse(run.started || "");
  if (Number.isNaN(start)) {
    document.getElementById("duration").textContent = "—";
    return;
  }
  const end = run.finished ? Date.parse(run.finished) : Date.now();
  document.getElementById("duration").textContent = duration(end - start);
}

async function reload() {
  try {
    showRun((await api("GET", `/api/runs/${encodeURIComponent(id)}`)).data);
  } catch (error) {
    if (error.status === 404) notice(`There is no run ${id}.`);
    else notice(`Could not load the run: ${error.message}`);
    throw error;
  }
}

cancelButton.addEventListener("click", async () => {
  cancelButton.disabled = true;
  try {
    const { data } = await api("DELETE", `/api/runs/${encodeURIComponent(id)}`);
    showRun(data);
    notice("Cancelling: the process gets SIGTERM, then SIGKILL after its grace period.", "info");
  } catch (error) {
    cancelButton.disabled = false;
    notice(`Could not cancel: ${error.message}`);
  }
});

async function main() {
  const hub = connect();
  try {
    await reload();
  } catch {
    return;
  }
  hub.subscribe(`jobs:${run.job}`, (message) => {
    if (message.event === "run") showRun(message.data);
  });
  const sub = hub.subscribe(run.channel, { since: 0 }, (message) => {
    appendLine(message);
    if (message.event === "exit") {
      const d = message.data || {};
      showRun({ ...run, status: d.status ?? run.status, exit_code: d.exit_code ?? null, signal: d.signal ?? null });
      reload().catch(() => {});
    }
  });
  sub.on("reset", () => notice("The start of this log was pruned by retention; showing from the oldest line kept.", "info"));
  sub.on("error", (error) => notice(`Cannot follow the log: ${error.message}`));
  setInterval(() => {
    tick();
  }, 1000);
  // A state change between loading and subscribing would be missed: check now and then.
  setInterval(() => {
    if (run && !FINAL.has(run.status) && !document.hidden) reload().catch(() => {});
  }, 5000);
}

main();
