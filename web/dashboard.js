// The dashboard: jobs (with a Run button), feeds, channels and webhooks, kept current by the
// hub's own channels (`jobs:{name}` run events, feed entries) and a periodic refresh.

import { api, askKey, channelHref, connect, el, notice, pill, runHref, timeEl } from "/assets/ui.js";

const hub = connect();

const jobsBody = document.querySelector("#jobs tbody");
const feedsBody = document.querySelector("#feeds tbody");
const channelsBody = document.querySelector("#channels tbody");
const webhooksBox = document.getElementById("webhooks");
const showRuns = document.getElementById("show-runs");

/** Replaces a table body's rows with one message row. */
function messageRow(tbody, columns, ...content) {
  tbody.replaceChildren(el("tr", { class: "empty-row" }, el("td", { colspan: columns }, ...content)));
}

function failure(tbody, columns, error) {
  if (error.status === 401 || error.status === 403) {
    messageRow(
      tbody,
      columns,
      "This needs an API key. ",
      el("button", { type: "button", class: "link", text: "Enter a key", on: { click: () => askKey("", { force: true }) } }),
    );
  } else {
    messageRow(tbody, columns, `Could not load: ${error.message}`);
  }
}

/** `td` with the column's name, which the narrow layout shows as a label. */
function cell(label, ...content) {
  return el("td", { "data-label": label }, ...content);
}

// ---- Jobs -----------------------------------------------------------------------------------

const jobRows = new Map(); // name → {row, cells, job}
const jobSubs = new Map(); // name → Subscription on jobs:{name}

function jobState(job) {
  if (job.running?.length) {
    return el(
      "span",
      {},
      pill("running"),
      " ",
      el("a", { href: runHref(job.running[0]), text: job.running.length > 1 ? `${job.running.length} runs` : "view" }),
    );
  }
  return el("span", { class: "muted", text: "idle" });
}

function lastRun(run) {
  if (!run) return el("span", { class: "muted", text: "never" });
  return el(
    "span",
    { class: "last-run" },
    pill(run.status),
    " ",
    el("a", { href: runHref(run.id), title: `run ${run.id}`, text: `#${run.id.slice(-6)}` }),
    " ",
    timeEl(run.finished || run.started || run.created),
  );
}

function runForm(job) {
  const inputs = (job.params || []).map((param) => {
    const id = `param-${job.name}-${param}`;
    return el(
      "span",
      { class: "param" },
      el("label", { for: id, text: param }),
      el("input", { id, name: param, autocomplete: "off", spellcheck: "false", placeholder: param }),
    );
  });
  const button = el("button", { type: "submit", class: "primary run-button", "aria-label": `Run ${job.name}`, text: "Run" });
  const form = el("form", { class: "run-form", dataset: { job: job.name } }, ...inputs, button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const params = {};
    for (const input of form.querySelectorAll("input")) if (input.value !== "") params[input.name] = input.value;
    button.disabled = true;
    notice("");
    try {
      const { data } = await api("POST", `/api/jobs/${encodeURIComponent(job.name)}/runs`, { params, trigger: "ui" });
      location.assign(runHref(data.id));
    } catch (error) {
      button.disabled = false;
      if (error.status === 409 && error.body?.run) {
        notice(`${error.message}. Its running run: ${error.body.run.id} (see the State column).`);
        refreshJobs();
      } else {
        notice(`Could not start ${job.name}: ${error.message}`);
      }
    }
  });
  return form;
}

function renderJobs(jobs) {
  if (jobs.length === 0) {
    jobRows.clear();
    messageRow(jobsBody, 5, "No jobs. Declare them as [[jobs]] in the config file.");
    return;
  }
  const names = new Set(jobs.map((j) => j.name));
  for (const [name, entry] of jobRows) {
    if (!names.has(name)) {
      entry.row.remove();
      jobRows.delete(name);
    }
  }
  for (const row of jobsBody.querySelectorAll(".empty-row")) row.remove();
  for (const job of jobs) {
    let entry = jobRows.get(job.name);
    if (!entry) {
      // Made once, so typing into the parameter inputs survives every refresh.
      const cells = {
        schedule: cell("Schedule"),
        state: cell("State"),
        last: cell("Last run"),
      };
      const row = el(
        "tr",
        { dataset: { job: job.name } },
        el("th", { scope: "row", "data-label": "Job" }, el("span", { class: "name", text: job.name })),
        cells.schedule,
        cells.state,
        cells.last,
        cell("Run", runForm(job)),
      );
      entry = { row, cells, job };
      jobRows.set(job.name, entry);
    }
    jobsBody.append(entry.row); // keeps the server's order
    entry.job = job;
    entry.cells.schedule.replaceChildren(job.schedule ? el("code", { text: job.schedule }) : el("span", { class: "muted", text: "manual" }));
    entry.cells.state.replaceChildren(jobState(job));
    entry.cells.last.replaceChildren(lastRun(job.last_run));
    if (!jobSubs.has(job.name)) {
      const sub = hub.subscribe(`jobs:${job.name}`, (message) => {
        if (message.event === "run" && message.data) onRunEvent(job.name, message.data);
      });
      jobSubs.set(job.name, sub);
    }
  }
}

/** A run changed state: show it at once, then ask the hub for the whole picture. */
function onRunEvent(name, run) {
  const entry = jobRows.get(name);
  if (entry) {
    const job = entry.job;
    const running = new Set(job.running || []);
    if (run.status === "running" || run.status === "queued") running.add(run.id);
    else running.delete(run.id);
    job.running = [...running];
    if (run.status !== "queued" && run.status !== "running") job.last_run = run;
    entry.cells.state.replaceChildren(jobState(job));
    entry.cells.last.replaceChildren(lastRun(job.last_run));
  }
  soon(refreshJobs);
}

async function refreshJobs() {
  try {
    const { data } = await api("GET", "/api/jobs");
    renderJobs(data.jobs || []);
  } catch (error) {
    failure(jobsBody, 5, error);
  }
}

// ---- Feeds ----------------------------------------------------------------------------------

const feedSubs = new Map();

function renderFeeds(feeds) {
  if (feeds.length === 0) {
    messageRow(feedsBody, 5, "No feeds. Add one with `tidings feeds add NAME URL` or [[feeds]] in the config.");
    return;
  }
  feedsBody.replaceChildren(
    ...feeds.map((feed) =>
      el(
        "tr",
        { dataset: { feed: feed.name } },
        el(
          "th",
          { scope: "row", "data-label": "Feed" },
          el("a", { href: channelHref(feed.channel), class: "name", text: feed.name }),
          el("div", { class: "muted small url", title: feed.url, text: feed.url }),
        ),
        cell("Status", feedStatus(feed)),
        cell("Last poll", timeEl(feed.last_poll)),
        cell("Entries", String(feed.entries_seen ?? 0)),
        cell("Last error", feed.error ? el("span", { class: "error-text", title: feed.error, text: feed.error }) : el("span", { class: "muted", text: "—" })),
      ),
    ),
  );
  for (const feed of feeds) {
    if (feedSubs.has(feed.channel)) continue;
    feedSubs.set(
      feed.channel,
      hub.subscribe(feed.channel, () => {
        soon(refreshFeeds);
        soon(refreshChannels);
      }),
    );
  }
}

function feedStatus(feed) {
  const p = pill(feed.status);
  if (feed.http_status) p.title = `last answer: HTTP ${feed.http_status}`;
  if (feed.consecutive_errors > 1) return el("span", {}, p, el("span", { class: "muted small", text: ` ×${feed.consecutive_errors}` }));
  return p;
}

async function refreshFeeds() {
  try {
    const { data } = await api("GET", "/api/feeds");
    renderFeeds(data.feeds || []);
  } catch (error) {
    failure(feedsBody, 5, error);
  }
}

// ---- Channels -------------------------------------------------------------------------------

let lastChannels = [];

function isRunLog(name) {
  return /^jobs:[^:]+:[^:]+$/.test(name);
}

function renderChannels(channels) {
  lastChannels = channels;
  const visible = channels
    .filter((c) => showRuns.checked || !isRunLog(c.name))
    .sort((a, b) => String(b.last_activity || "").localeCompare(String(a.last_activity || "")) || a.name.localeCompare(b.name));
  if (visible.length === 0) {
    messageRow(channelsBody, 4, "No channels yet. Publish a message and it appears here.");
    return;
  }
  const shown = visible.slice(0, 200);
  channelsBody.replaceChildren(
    ...shown.map((c) =>
      el(
        "tr",
        { dataset: { channel: c.name } },
        el("th", { scope: "row", "data-label": "Channel" }, el("a", { href: channelHref(c.name), class: "name", text: c.name })),
        cell("Messages", String(c.messages ?? 0)),
        cell("Subscribers", String(c.subscribers ?? 0)),
        cell("Last activity", timeEl(c.last_activity)),
      ),
    ),
  );
  if (visible.length > shown.length) {
    channelsBody.append(el("tr", { class: "empty-row" }, el("td", { colspan: 4, text: `…and ${visible.length - shown.length} more` })));
  }
}

async function refreshChannels() {
  try {
    const { data } = await api("GET", "/api/channels");
    renderChannels(data.channels || []);
  } catch (error) {
    failure(channelsBody, 4, error);
  }
}

showRuns.addEventListener("change", () => renderChannels(lastChannels));

document.getElementById("open-channel").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = document.getElementById("open-channel-name").value.trim();
  if (!/^[A-Za-z0-9_.@-]+(:[A-Za-z0-9_.@-]+)*$/.test(name)) {
    notice(`"${name}" is not a channel name: segments of letters, digits and _ . @ - joined by single colons.`);
    return;
  }
  location.assign(channelHref(name));
});

// ---- Webhooks -------------------------------------------------------------------------------

async function refreshWebhooks() {
  let hooks = [];
  try {
    const { data } = await api("GET", "/api/webhooks");
    hooks = data.webhooks || [];
  } catch (error) {
    if (error.status !== 404) {
      webhooksBox.replaceChildren(el("p", { class: "empty", text: `Could not load: ${error.message}` }));
      return;
    }
    // No webhooks endpoint on this hub (yet): nothing to show.
  }
  if (hooks.length === 0) {
    webhooksBox.replaceChildren(el("p", { class: "empty", text: "none" }));
    return;
  }
  webhooksBox.replaceChildren(
    el(
      "table",
      { class: "grid" },
      el(
        "thead",
        {},
        el("tr", {}, ...["Webhook", "Channels", "State", "Deliveries"].map((h) => el("th", { scope: "col", text: h }))),
      ),
      el(
        "tbody",
        {},
        ...hooks.map((h) =>
          el(
            "tr",
            {},
            el("th", { scope: "row", "data-label": "Webhook" }, el("span", { class: "name", text: h.url }), el("div", { class: "muted small", text: h.id })),
            cell("Channels", (h.channels || []).join(", ")),
            cell("State", pill(h.state), h.last_error && h.state !== "active" ? el("div", { class: "muted small", text: h.last_error }) : null),
            cell("Deliveries", `${h.pending ?? 0} pending · ${h.failed ?? 0} failed`),
          ),
        ),
      ),
    ),
  );
}

// ---- Refresh --------------------------------------------------------------------------------

const pending = new Map();
/** Runs `fn` once shortly, however many events ask for it meanwhile. */
function soon(fn, ms = 300) {
  if (pending.has(fn)) return;
  pending.set(
    fn,
    setTimeout(() => {
      pending.delete(fn);
      fn();
    }, ms),
  );
}

function refreshAll() {
  refreshJobs();
  refreshFeeds();
  refreshChannels();
  refreshWebhooks();
}

let wasOffline = false;
hub.on("state", (state) => {
  if (state === "offline") wasOffline = true;
  if (state === "live" && wasOffline) {
    wasOffline = false;
    refreshAll(); // catch up with whatever changed while we were away
  }
});

refreshAll();
setInterval(() => {
  if (document.hidden) return;
  refreshChannels();
  refreshFeeds();
  refreshWebhooks();
}, 5000);
setInterval(() => {
  if (document.hidden) return;
  refreshJobs();
}, 15000);
