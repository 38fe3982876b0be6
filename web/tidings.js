// Tidings browser client — served by the hub at /tidings.js. Plain ES module, no dependencies.
//
//   import { Tidings } from "http://127.0.0.1:8080/tidings.js";
//   const hub = new Tidings("http://127.0.0.1:8080", { token });        // token optional
//   const sub = hub.subscribe("feeds:stackoverflow", { since: 0 }, (msg) => render(msg));
//   hub.on("state", (s) => …);          // "connecting" | "live" | "offline"
//   sub.on("reset", (info) => …);       // history truncated or epoch changed
//   const ack = await hub.publish("chat:lobby", { text: "hi" });   // {seq, duplicate}
//   sub.close();
//
// Transports: one WebSocket for every subscription; if it cannot connect, Server-Sent Events
// (one EventSource per subscription); then long-polling. `transports: ["sse"]` forces a list.
// After a drop it reconnects with jittered exponential backoff and resumes each subscription
// from its last seq and epoch; a seq is never handed to the application twice.

const ALL_TRANSPORTS = ["ws", "sse", "longpoll"];
const STATES = ["connecting", "live", "offline"];
/** How long one transport may take to connect before the next one is tried. */
const OPEN_TIMEOUT = 10000;

function withTimeout(promise, ms) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new TidingsError("timed out connecting", { code: "timeout" })), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** An error from the hub (HTTP status and/or the protocol's error code). */
export class TidingsError extends Error {
  constructor(message, { status = 0, code = "error", body = null } = {}) {
    super(message);
    this.name = "TidingsError";
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

class Emitter {
  constructor() {
    this._handlers = new Map();
  }

  /** Adds a listener; returns a function that removes it. */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    this._handlers.get(event)?.delete(fn);
  }

  _emit(event, ...args) {
    const set = this._handlers.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (error) {
        // A listener's bug must not break delivery to the others; still report it.
        setTimeout(() => {
          throw error;
        });
      }
    }
  }
}

/** One subscription to one channel. Events: "message", "reset", "subscribed", "error". */
export class Subscription extends Emitter {
  constructor(hub, channel, options) {
    super();
    this.hub = hub;
    this.channel = channel;
    /** The last seq handed to the application (null: live only, not yet known). */
    this.lastSeq = Number.isInteger(options.since) && options.since >= 0 ? options.since : null;
    /** The epoch of the history `lastSeq` belongs to. */
    this.epoch = typeof options.epoch === "string" ? options.epoch : null;
    this.closed = false;
    /** Set when the hub refused this subscription (forbidden, bad name): not retried. */
    this.failed = null;
  }

  /** Stops the subscription; no message is delivered after this returns. */
  close() {
    if (this.closed) return;
    this.closed = true;
    this.hub._unsubscribe(this);
  }

  _deliver(message, epoch) {
    if (this.closed) return;
    if (typeof message.seq !== "number") return;
    if (epoch && this.epoch && epoch !== this.epoch) {
      // A different history (the hub always says so first): seqs start again.
      this._reset(epoch, null);
    }
    if (epoch) this.epoch = epoch;
    if (this.lastSeq !== null && message.seq <= this.lastSeq) return; // already handed over
    this.lastSeq = message.seq;
    this._emit("message", message);
  }

  /**
   * History was truncated or replaced. `firstSeq`: the seq delivery resumes at; `null`: not
   * known (whatever comes next is new); `undefined`: same history, only older messages were
   * pruned, so the position still holds.
   */
  _reset(epoch, firstSeq) {
    if (this.closed) return;
    this.epoch = epoch;
    if (Number.isInteger(firstSeq)) this.lastSeq = firstSeq - 1;
    else if (firstSeq === null) this.lastSeq = 0;
    this._emit("reset", { channel: this.channel, epoch, first_seq: Number.isInteger(firstSeq) ? firstSeq : null });
  }

  _fail(error) {
    this.failed = error;
    this._emit("error", error);
    this.hub._emit("error", error);
  }
}

function defaultBase() {
  try {
    return new URL(import.meta.url).origin;
  } catch {
    return globalThis.location ? globalThis.location.origin : "http://127.0.0.1:8080";
  }
}

function channelPath(channel) {
  return `/api/channels/${encodeURIComponent(channel)}`;
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    /* not JSON */
  }
  const code = body?.error?.code ?? `http_${response.status}`;
  const message = body?.error?.message ?? `HTTP ${response.status}`;
  return new TidingsError(message, { status: response.status, code, body });
}

/** Statuses that say "this request is wrong", as opposed to "the hub is unreachable". */
function isPermanent(status) {
  return status >= 400 && status < 500 && status !== 408 && status !== 429;
}

export class Tidings extends Emitter {
  /**
   * @param {string} [url] the hub's base URL (default: where this script was loaded from)
   * @param {object} [options] `token`, `transports` (["ws","sse","longpoll"]), `backoff`
   *   ({min, max} in ms), `longPollWait` (seconds)
   */
  constructor(url, options = {}) {
    super();
    if (url && typeof url === "object") {
      options = url;
      url = undefined;
    }
    this.url = String(url || defaultBase()).replace(/\/+$/, "");
    this.token = options.token || null;
    const wanted = options.transports ?? ALL_TRANSPORTS;
    this.transports = (Array.isArray(wanted) ? wanted : [wanted]).filter((t) => ALL_TRANSPORTS.includes(t));
    if (this.transports.length === 0) throw new TidingsError(`transports must name some of ${ALL_TRANSPORTS.join(", ")}`);
    this.backoff = { min: options.backoff?.min ?? 500, max: options.backoff?.max ?? 15000 };
    this.longPollWait = options.longPollWait ?? 25;
    /** "connecting" | "live" | "offline" */
    this.state = "connecting";
    /** The transport in use while live: "ws", "sse" or "longpoll". */
    this.transport = null;
    this._subs = new Set();
    this._conn = null;
    this._attempt = 0;
    this._timer = null;
    this._generation = 0;
    this._good = null; // the transport that last worked: tried alone first
    this._failedRounds = 0;
    this._closed = false;
    this._onOnline = () => this._reconnectNow();
    globalThis.addEventListener?.("online", this._onOnline);
    queueMicrotask(() => this._connect());
  }

  /**
   * Subscribes to `channel`. `options.since`: the last seq you have (0 = all history; absent =
   * live only); `options.epoch`: the epoch that seq belongs to. `handler(message)` is optional
   * (same as `sub.on("message", handler)`).
   */
  subscribe(channel, options = {}, handler = undefined) {
    if (typeof options === "function") {
      handler = options;
      options = {};
    }
    if (this._closed) throw new TidingsError("this Tidings client is closed");
    const sub = new Subscription(this, String(channel), options || {});
    if (handler) sub.on("message", handler);
    this._subs.add(sub);
    this._conn?.add(sub);
    return sub;
  }

  /**
   * Publishes `data` to `channel` (`options.event`, `options.id` optional). Resolves with the
   * ack `{seq, duplicate}`; over the WebSocket when it is open, else by HTTP POST.
   */
  publish(channel, data, options = {}) {
    const item = { data: data === undefined ? null : data };
    if (options.event !== undefined) item.event = options.event;
    if (options.id !== undefined) item.id = options.id;
    if (this._conn instanceof WsConnection && this._conn.isOpen()) {
      return this._conn.publish(String(channel), item);
    }
    return this._httpPublish(String(channel), item);
  }

  /** Replaces the credential and reconnects with it. */
  setToken(token) {
    this.token = token || null;
    for (const sub of this._subs) sub.failed = null;
    this._good = null; // a refused credential may have pushed us off the preferred transport
    this._reconnectNow();
  }

  /** Closes every connection; the client cannot be used afterwards. */
  close() {
    this._closed = true;
    clearTimeout(this._timer);
    globalThis.removeEventListener?.("online", this._onOnline);
    const conn = this._conn;
    this._conn = null;
    conn?.close();
    for (const sub of this._subs) sub.closed = true;
    this._subs.clear();
    this._setState("offline");
  }

  // ---- internals ------------------------------------------------------------------------

  _headers(json = false) {
    const h = {};
    if (json) h["content-type"] = "application/json";
    if (this.token) h.authorization = `Bearer ${this.token}`;
    return h;
  }

  async _httpPublish(channel, item) {
    const response = await fetch(`${this.url}${channelPath(channel)}/messages`, {
      method: "POST",
      headers: this._headers(true),
      body: JSON.stringify(item),
    });
    if (!response.ok) throw await errorFrom(response);
    const body = await response.json();
    return { seq: body.seq, duplicate: body.duplicate, id: body.id };
  }

  _setState(state) {
    if (!STATES.includes(state) || state === this.state) return;
    this.state = state;
    this._emit("state", state);
  }

  _unsubscribe(sub) {
    this._subs.delete(sub);
    this._conn?.remove(sub);
  }

  _reconnectNow() {
    if (this._closed) return;
    clearTimeout(this._timer);
    this._timer = null;
    this._attempt = 0;
    const conn = this._conn;
    this._conn = null;
    conn?.close();
    this._connect();
  }

  async _connect() {
    if (this._closed) return;
    const generation = ++this._generation;
    this._timer = null;
    this.transport = null;
    this._setState("connecting");
    const order = this._good ? [this._good] : this.transports;
    for (const name of order) {
      const conn =
        name === "ws" ? new WsConnection(this) : name === "sse" ? new SseConnection(this) : new LongPollConnection(this);
      const included = [...this._subs].filter((s) => !s.closed);
      try {
        await withTimeout(conn.open(included), OPEN_TIMEOUT);
      } catch {
        conn.close();
        if (generation !== this._generation || this._closed) return;
        continue;
      }
      if (generation !== this._generation || this._closed) {
        conn.close();
        return;
      }
      this._conn = conn;
      // Subscriptions added or closed while it was opening.
      for (const sub of included) if (!this._subs.has(sub)) conn.remove(sub);
      for (const sub of this._subs) if (!included.includes(sub)) conn.add(sub);
      this.transport = name;
      this._good = name;
      this._failedRounds = 0;
      this._attempt = 0;
      this._setState("live");
      return;
    }
    // Every transport failed this round.
    this._failedRounds += 1;
    if (this._good && this._failedRounds >= 3) this._good = null; // try the whole list again
    this._setState("offline");
    this._scheduleReconnect();
  }

  /** A live connection dropped. */
  _lost(conn) {
    if (conn !== this._conn || this._closed) return;
    this._conn = null;
    this.transport = null;
    conn.close();
    this._setState("offline");
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    if (this._closed || this._timer) return;
    const base = Math.min(this.backoff.max, this.backoff.min * 2 ** this._attempt);
    const delay = base / 2 + Math.random() * (base / 2); // jittered: never a thundering herd
    this._attempt = Math.min(this._attempt + 1, 20);
    this._timer = setTimeout(() => this._connect(), delay);
  }
}

// ---- WebSocket: one socket, many subscriptions ---------------------------------------------

class WsConnection {
  constructor(hub) {
    this.hub = hub;
    this.ws = null;
    this.opened = false;
    this.closed = false;
    /** channel → { subs: Set<Subscription>, since, answered } */
    this.wires = new Map();
    this.pending = new Map(); // ref → {resolve, reject, item, channel}
    this.nextRef = 1;
    this.pingTimer = null;
    this.pongDeadline = null;
  }

  isOpen() {
    return this.opened && !this.closed && this.ws?.readyState === WebSocket.OPEN;
  }

  open(subs) {
    const hub = this.hub;
    let url = `${hub.url.replace(/^http/, "ws")}/ws`;
    if (hub.token) url += `?token=${encodeURIComponent(hub.token)}`;
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new WebSocket(url);
      } catch (error) {
        reject(error);
        return;
      }
      this.ws = ws;
      ws.onopen = () => {
        this.opened = true;
        for (const sub of subs) this.add(sub);
        this.pingTimer = setInterval(() => this.keepalive(), 30000);
        resolve();
      };
      ws.onmessage = (event) => this.frame(event.data);
      ws.onclose = () => {
        const wasOpen = this.opened;
        this.shutdown();
        if (wasOpen) hub._lost(this);
        else reject(new TidingsError("WebSocket did not open"));
      };
      ws.onerror = () => {}; // onclose follows and says everything
    });
  }

  keepalive() {
    if (!this.isOpen()) return;
    if (this.pongDeadline) return;
    this.send({ op: "ping" });
    this.pongDeadline = setTimeout(() => {
      // No pong in 10 s: the network is gone without telling us.
      try {
        this.ws.close();
      } catch {
        /* ignore */
      }
    }, 10000);
  }

  send(frame) {
    if (this.ws?.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
  }

  add(sub) {
    if (this.closed || !this.opened || sub.failed) return;
    let wire = this.wires.get(sub.channel);
    if (!wire) {
      wire = { subs: new Set(), since: null, epoch: null, answered: false, epochNow: null };
      this.wires.set(sub.channel, wire);
    }
    wire.subs.add(sub);
    this.subscribeWire(sub.channel, wire);
  }

  /** (Re)sends the subscription of a channel, from the earliest position any of its subs needs. */
  subscribeWire(channel, wire) {
    const known = [...wire.subs].filter((s) => s.lastSeq !== null);
    const frame = { op: "subscribe", channel };
    if (known.length > 0) {
      const first = known.reduce((a, b) => (b.lastSeq < a.lastSeq ? b : a));
      frame.since = first.lastSeq;
      if (first.epoch) frame.epoch = first.epoch;
    }
    if (wire.answered && frame.since === wire.since) return; // already flowing from there
    wire.since = frame.since ?? null;
    wire.epoch = frame.epoch ?? null;
    wire.answered = false;
    this.send(frame);
  }

  remove(sub) {
    const wire = this.wires.get(sub.channel);
    if (!wire) return;
    wire.subs.delete(sub);
    if (wire.subs.size === 0) {
      this.wires.delete(sub.channel);
      this.send({ op: "unsubscribe", channel: sub.channel });
    }
  }

  frame(text) {
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    switch (f.op) {
      case "message": {
        const wire = this.wires.get(f.channel);
        if (!wire) return;
        const { op: _op, ...message } = f;
        for (const sub of wire.subs) sub._deliver(message, wire.epochNow);
        return;
      }
      case "subscribed":
        return this.subscribed(f);
      case "ack": {
        const p = this.pending.get(f.ref);
        if (!p) return;
        this.pending.delete(f.ref);
        p.resolve({ seq: f.seq, duplicate: f.duplicate });
        return;
      }
      case "error": {
        if (f.ref !== undefined && this.pending.has(f.ref)) {
          const p = this.pending.get(f.ref);
          this.pending.delete(f.ref);
          p.reject(new TidingsError(f.message, { code: f.code, body: f }));
          return;
        }
        const error = new TidingsError(f.message, { code: f.code, body: f });
        const wire = f.channel ? this.wires.get(f.channel) : null;
        if (wire) {
          this.wires.delete(f.channel);
          for (const sub of wire.subs) sub._fail(error);
        } else {
          this.hub._emit("error", error);
        }
        return;
      }
      case "pong":
        clearTimeout(this.pongDeadline);
        this.pongDeadline = null;
        return;
      default:
    }
  }

  subscribed(f) {
    const wire = this.wires.get(f.channel);
    if (!wire) return;
    const initial = !wire.answered;
    wire.answered = true;
    wire.epochNow = f.epoch;
    for (const sub of wire.subs) {
      if (sub.lastSeq === null) {
        // Live only: start after what exists now.
        sub.lastSeq = f.last_seq;
        sub.epoch = f.epoch;
      } else if (f.truncated) {
        const epochChanged = sub.epoch !== null && sub.epoch !== f.epoch;
        if (initial) {
          // History from the oldest retained message follows.
          if (epochChanged || f.last_seq < sub.lastSeq) sub._reset(f.epoch, null);
          else if (sub.lastSeq === wire.since) sub._reset(f.epoch, undefined);
        } else if (epochChanged) {
          sub._reset(f.epoch, f.last_seq + 1);
        } else if (sub.lastSeq < f.last_seq) {
          sub._reset(f.epoch, f.last_seq + 1);
        }
      } else {
        sub.epoch = f.epoch;
      }
      sub._emit("subscribed", { channel: f.channel, epoch: f.epoch, last_seq: f.last_seq, truncated: f.truncated });
    }
  }

  publish(channel, item) {
    return new Promise((resolve, reject) => {
      const ref = this.nextRef++;
      this.pending.set(ref, { resolve, reject, item, channel });
      this.send({ op: "publish", channel, ref, ...item });
    });
  }

  /** Socket gone: settle publishes still waiting for their ack. */
  shutdown() {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.pingTimer);
    clearTimeout(this.pongDeadline);
    const pending = [...this.pending.values()];
    this.pending.clear();
    for (const p of pending) {
      if (p.item.id !== undefined) {
        // Idempotent: the same id cannot be stored twice, so it is safe to send again.
        this.hub._httpPublish(p.channel, p.item).then(p.resolve, p.reject);
      } else {
        p.reject(
          new TidingsError("the connection closed before the publish was acknowledged (give an id to make retries safe)", {
            code: "disconnected",
          }),
        );
      }
    }
  }

  close() {
    this.shutdown();
    if (this.ws) {
      this.ws.onclose = null;
      this.ws.onmessage = null;
      try {
        this.ws.close();
      } catch {
        /* ignore */
      }
    }
  }
}

// ---- Server-Sent Events and long-polling: one stream per subscription ----------------------

/** Resolves a live-only subscription's starting point (the channel's current last seq). */
async function resolveStart(hub, sub, signal) {
  if (sub.lastSeq !== null) return;
  const response = await fetch(`${hub.url}${channelPath(sub.channel)}`, { headers: hub._headers(), signal });
  if (!response.ok) throw await errorFrom(response);
  const info = await response.json();
  if (sub.lastSeq === null) {
    sub.lastSeq = info.last_seq;
    sub.epoch = info.epoch;
  }
}

/** Is the hub reachable at all? (A connection with no subscriptions still wants to know.) */
async function probe(hub, signal) {
  const response = await fetch(`${hub.url}/healthz`, { signal, cache: "no-store" });
  if (!response.ok) throw new TidingsError(`hub answered ${response.status}`, { status: response.status });
}

class StreamConnection {
  constructor(hub) {
    this.hub = hub;
    this.streams = new Map(); // Subscription → stream state
    this.opened = false;
    this.closed = false;
    this.abort = new AbortController();
  }

  async open(subs) {
    await probe(this.hub, this.abort.signal);
    await Promise.all(subs.map((sub) => this.start(sub)));
    if (this.closed) throw new TidingsError("closed");
    this.opened = true;
  }

  add(sub) {
    if (!this.opened || this.closed || sub.failed) return;
    this.start(sub).catch(() => this.lost());
  }

  remove(sub) {
    const s = this.streams.get(sub);
    this.streams.delete(sub);
    s?.stop();
  }

  /** The hub went away under a stream. */
  lost() {
    if (this.closed) return;
    if (this.opened) this.hub._lost(this);
    else this.close();
  }

  /** A stream failed: a refusal (4xx) fails that subscription, anything else the connection. */
  async diagnose(sub, error) {
    if (error instanceof TidingsError && isPermanent(error.status)) {
      this.remove(sub);
      sub._fail(error);
      return true;
    }
    return false;
  }

  close() {
    this.closed = true;
    this.abort.abort();
    for (const s of this.streams.values()) s.stop();
    this.streams.clear();
  }
}

class SseConnection extends StreamConnection {
  /** Resolves once the EventSource is open (or the subscription was refused). */
  start(sub) {
    return new Promise((resolve, reject) => {
      const hub = this.hub;
      const state = { es: null, stop: () => state.es?.close() };
      this.streams.set(sub, state);
      const begin = async () => {
        try {
          await resolveStart(hub, sub, this.abort.signal);
        } catch (error) {
          if (await this.diagnose(sub, error)) resolve();
          else reject(error);
          return;
        }
        if (this.closed || this.streams.get(sub) !== state) return resolve();
        const params = new URLSearchParams({ since: String(sub.lastSeq) });
        if (sub.epoch) params.set("epoch", sub.epoch);
        if (hub.token) params.set("token", hub.token);
        const es = new EventSource(`${hub.url}${channelPath(sub.channel)}/events?${params}`);
        state.es = es;
        let opened = false;
        es.onopen = () => {
          opened = true;
          resolve();
        };
        es.onmessage = (event) => {
          let message;
          try {
            message = JSON.parse(event.data);
          } catch {
            return;
          }
          const colon = event.lastEventId.lastIndexOf(":");
          const epoch = colon > 0 ? event.lastEventId.slice(0, colon) : null;
          sub._deliver(message, epoch);
        };
        es.addEventListener("reset", (event) => {
          try {
            const info = JSON.parse(event.data);
            sub._reset(info.epoch, info.first_seq);
          } catch {
            /* ignore a malformed reset */
          }
        });
        es.onerror = async () => {
          // EventSource would reconnect by itself; we resume ourselves (with backoff and the
          // epoch), so stop it here and find out why it failed.
          es.close();
          if (this.closed || this.streams.get(sub) !== state) return;
          if (!opened) {
            // Refused before opening: a status we cannot see from EventSource — ask plainly.
            try {
              const check = await fetch(
                `${hub.url}${channelPath(sub.channel)}/messages?since=0&limit=1`,
                { headers: hub._headers(), signal: this.abort.signal },
              );
              if (!check.ok && (await this.diagnose(sub, await errorFrom(check)))) return resolve();
            } catch {
              /* unreachable: fall through */
            }
            reject(new TidingsError("EventSource failed"));
            if (this.opened) this.lost();
            return;
          }
          this.lost();
        };
      };
      begin();
    });
  }
}

class LongPollConnection extends StreamConnection {
  /** Resolves after the first successful read of the subscription. */
  start(sub) {
    return new Promise((resolve, reject) => {
      const hub = this.hub;
      const controller = new AbortController();
      const state = { stop: () => controller.abort() };
      this.streams.set(sub, state);
      const signal = controller.signal;
      this.abort.signal.addEventListener("abort", () => controller.abort());
      let first = true;
      const loop = async () => {
        try {
          await resolveStart(hub, sub, signal);
          let caughtUp = false;
          while (!this.closed && this.streams.get(sub) === state && !sub.closed) {
            const params = new URLSearchParams({ since: String(sub.lastSeq), limit: "1000" });
            if (sub.epoch) params.set("epoch", sub.epoch);
            if (caughtUp) params.set("wait", String(hub.longPollWait));
            // Each request has a deadline too: a network that vanishes silently is noticed.
            const request = new AbortController();
            const deadline = setTimeout(() => request.abort(), ((caughtUp ? hub.longPollWait : 0) + 15) * 1000);
            const forward = () => request.abort();
            signal.addEventListener("abort", forward, { once: true });
            let response;
            let body;
            try {
              response = await fetch(`${hub.url}${channelPath(sub.channel)}/messages?${params}`, {
                headers: hub._headers(),
                signal: request.signal,
                cache: "no-store",
              });
              if (!response.ok) throw await errorFrom(response);
              body = await response.json();
            } finally {
              clearTimeout(deadline);
              signal.removeEventListener("abort", forward);
            }
            if (this.streams.get(sub) !== state) return;
            if (body.truncated) {
              const changed = sub.epoch !== null && sub.epoch !== body.epoch;
              const firstSeq = body.messages[0]?.seq ?? null;
              if (changed || body.last_seq < sub.lastSeq) sub._reset(body.epoch, firstSeq);
              else sub._reset(body.epoch, undefined);
            }
            for (const message of body.messages) sub._deliver(message, body.epoch);
            if (body.messages.length === 0) sub.epoch = body.epoch;
            caughtUp = body.messages.length === 0 || sub.lastSeq >= body.last_seq;
            if (first) {
              first = false;
              resolve();
            }
          }
        } catch (error) {
          if (signal.aborted || this.closed) return first ? resolve() : undefined;
          if (await this.diagnose(sub, error)) return first ? resolve() : undefined;
          if (first) reject(error);
          else this.lost();
        }
      };
      loop();
    });
  }
}
