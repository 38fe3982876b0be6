// A channel, live. Feed entries (event "entry", or any message of a `feeds:` channel that looks
// like one) are cards, newest on top; other messages are rows (seq, time, event, JSON).

import { api, connect, el, notice, runHref, safeHref, timeEl } from "/assets/ui.js";

const HISTORY = 200; // messages shown on opening
const KEEP = 500; // at most this many items stay on the page

const entriesBox = document.getElementById("entries");
const rowsBox = document.getElementById("messages");
const rowsBody = rowsBox.querySelector("tbody");
const empty = document.getElementById("empty");
const meta = document.getElementById("channel-meta");

let name = "";
try {
  name = decodeURIComponent(location.pathname.replace(/^\/channels\//, ""));
} catch {
  name = "";
}

function shortTime(iso) {
  // 10:00:00.123 (UTC), the date in the tooltip
  const m = /T(\d\d:\d\d:\d\d(?:\.\d+)?)/.exec(iso || "");
  return m ? m[1] : String(iso || "");
}

function isEntry(message) {
  if (message.event === "entry") return true;
  const d = message.data;
  return name.startsWith("feeds:") && d !== null && typeof d === "object" && ("title" in d || "link" in d);
}

function card(message, animate) {
  const d = message.data && typeof message.data === "object" ? message.data : {};
  const title = typeof d.title === "string" && d.title.trim() !== "" ? d.title : "(untitled)";
  const href = safeHref(d.link);
  const when = d.published || d.updated || message.time;
  const metaParts = [];
  if (typeof d.author === "string" && d.author) metaParts.push(el("span", { class: "author", text: d.author }));
  if (typeof d.feed === "string" && d.feed) metaParts.push(el("span", { class: "feed", text: d.feed }));
  metaParts.push(timeEl(when));
  const summary = typeof d.summary === "string" ? d.summary.trim() : "";
  const categories = Array.isArray(d.categories) ? d.categories.filter((c) => typeof c === "string").slice(0, 8) : [];
  return el(
    "article",
    { class: animate ? "card new" : "card", dataset: { seq: message.seq } },
    el(
      "h3",
      { class: "card-title" },
      href ? el("a", { href, rel: "noopener noreferrer nofollow", text: title }) : el("span", { text: title }),
    ),
    el("p", { class: "card-meta muted small" }, ...metaParts.flatMap((p, i) => (i ? [" · ", p] : [p]))),
    summary ? el("p", { class: "card-summary", text: summary.length > 300 ? `${summary.slice(0, 300)}…` : summary }) : null,
    categories.length ? el("ul", { class: "tags" }, ...categories.map((c) => el("li", { text: c }))) : null,
  );
}

function row(message, animate) {
  let json;
  try {
    json = JSON.stringify(message.data);
  } catch {
    json = String(message.data);
  }
  return el(
    "tr",
    { class: animate ? "new" : null, dataset: { seq: message.seq } },
    el("td", { "data-label": "Seq", class: "num", text: String(message.seq) }),
    el("td", { "data-label": "Time" }, el("time", { datetime: message.time, title: message.time, text: shortTime(message.time) })),
    el("td", { "data-label": "Event" }, el("code", { text: message.event })),
    el("td", { "data-label": "Data" }, el("pre", { class: "json", text: json })),
  );
}

function trim(container) {
  while (container.children.length > KEEP) container.lastElementChild.remove();
}

async function main() {
  if (!/^[A-Za-z0-9_.@-]+(:[A-Za-z0-9_.@-]+)*$/.test(name) || name.length > 255) {
    document.getElementById("channel-name").textContent = "Not a channel name";
    empty.hidden = true;
    notice("Channel names are segments of letters, digits and _ . @ - joined by single colons.");
    return;
  }
  document.title = `${name} · Tidings`;
  document.getElementById("channel-name").textContent = name;
  const run = /^jobs:[^:]+:([^:]+)$/.exec(name);
  const hub = connect();

  let info = null;
  try {
    info = (await api("GET", `/api/channels/${encodeURIComponent(name)}`)).data;
  } catch (error) {
    notice(`Could not read the channel: ${error.message}`);
  }
  let epoch = info?.epoch ?? null;
  const liveAfter = info?.last_seq ?? 0; // later messages slide in
  const showMeta = () => {
    const parts = [];
    if (info) parts.push(`${info.messages} message${info.messages === 1 ? "" : "s"} kept`, `epoch ${epoch}`);
    meta.replaceChildren(parts.join(" · "));
    if (run) meta.append(parts.length ? " · " : "", el("a", { href: runHref(run[1]), text: "view as a run log" }));
  };
  showMeta();

  const since = info ? Math.max(0, info.last_seq - HISTORY) : 0;
  const sub = hub.subscribe(name, { since, epoch: info?.epoch }, (message) => {
    const animate = message.seq > liveAfter || epoch !== info?.epoch;
    if (isEntry(message)) {
      entriesBox.hidden = false;
      entriesBox.prepend(card(message, animate));
      trim(entriesBox);
    } else {
      rowsBox.hidden = false;
      rowsBody.prepend(row(message, animate));
      trim(rowsBody);
    }
    empty.hidden = true;
    if (info) {
      info.messages += message.seq > info.last_seq ? 1 : 0;
      info.last_seq = Math.max(info.last_seq, message.seq);
    }
  });
  sub.on("reset", (reset) => {
    if (reset.epoch !== epoch) {
      // A new history: what is on the page belongs to the old one.
      entriesBox.replaceChildren();
      rowsBody.replaceChildren();
      entriesBox.hidden = rowsBox.hidden = true;
      empty.hidden = false;
      epoch = reset.epoch;
      if (info) info.messages = 0;
      notice("The channel's history was deleted or replaced; showing the new one.", "info");
    } else {
      notice("Older messages were pruned by retention; showing from the oldest one kept.", "info");
    }
    showMeta();
  });
  sub.on("error", (error) => notice(`Subscription refused: ${error.message}`));
}

main();
