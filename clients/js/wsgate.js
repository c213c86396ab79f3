// wsgate JavaScript client: protocol v1 (see PROTOCOL.md / the project README).
//
// One ES module, no dependencies. Works in browsers and in Node >= 22 (global WebSocket),
// Node 20 with `--experimental-websocket`, or anywhere a WHATWG-compatible WebSocket
// constructor is passed as `options.WebSocket`.
//
//   import { WsgateClient } from "./wsgate.js";
//   const c = new WsgateClient({ url: "ws://127.0.0.1:8080/ws", user: "alice" });
//   c.on("message", (m) => console.log(m.from, m.room, m.data));
//   await c.connect();
//   await c.join("lobby");
//   const { delivered } = await c.publish("lobby", { text: "hi" });

/** Default reconnect backoff, in milliseconds. */
export const DEFAULT_BACKOFF = Object.freeze({
  initial: 1000, // window of the first retry: delay = random(0, initial)
  max: 30000, // the window never grows past this
  factor: 2, // window growth per failed attempt
  restartWindow: 5000, // after 1001 (server shutting down) the first window is at least this
  slowDelay: 5000, // after 1013 (slow consumer / overloaded): wait at least this, plus jitter
});

/** Errors the client raises itself (the server's codes are listed in the protocol). */
export const CLIENT_ERROR_CODES = Object.freeze([
  "timeout", // no ack/error within requestTimeout
  "not_connected", // a request made while disconnected (and no offline queue, or it is full)
  "connection_closed", // the connection closed before the answer arrived
  "client_closed", // close() was called
  "token_expired", // the token expired and there is no getToken to renew it
  "policy_close", // the server closed with 1008 (kicked, rate abuse) and reconnecting is off
]);

/** An error answered by the server (`code` = bad_user, bad_room, ...) or raised by the client. */
export class WsgateError extends Error {
  constructor(code, message, request) {
    super(message || code);
    this.name = "WsgateError";
    this.code = code;
    if (request !== undefined) this.request = request;
  }
}

/**
 * Delay before a reconnect attempt, with FULL jitter:
 * `floor + random() * max(minWindow, min(max, initial * factor ** attempt))`.
 * `attempt` counts failed attempts since the last successful connection (0 = first retry).
 * `random` returns a number in [0, 1) (Math.random by default; inject one in tests).
 */
export function reconnectDelay(attempt, backoff = DEFAULT_BACKOFF, random = Math.random, extra = {}) {
  const b = { ...DEFAULT_BACKOFF, ...backoff };
  const grown = b.initial * Math.pow(b.factor, Math.max(0, attempt));
  const window = Math.max(extra.minWindow || 0, Math.min(b.max, grown));
  return (extra.floor || 0) + random() * window;
}

/**
 * What to do after the server (or the network) closed the connection.
 * Returns `{ reconnect, refreshToken, floor, minWindow, error? }`:
 *  - 1001 server shutting down: reconnect, first window at least `restartWindow`
 *    (every client of that server comes back at once: spread them);
 *  - 1013 slow consumer / overloaded: reconnect no sooner than `slowDelay`, spread over
 *    another `slowDelay` at least;
 *  - 1008 "token expired": fetch a fresh token with getToken(), then reconnect; without
 *    getToken, stop (the same token would be refused);
 *  - 1008 otherwise (kicked by the API, rate-limit abuse): stop, unless
 *    `reconnectOnPolicyClose` is set (then like 1013);
 *  - 4000 idle timeout, 1006 network loss, 1000, 1011, and anything else: reconnect.
 */
export function closePolicy(code, reason = "", opts = {}) {
  const b = { ...DEFAULT_BACKOFF, ...(opts.backoff || {}) };
  const plain = { reconnect: true, refreshToken: false, floor: 0, minWindow: 0 };
  switch (code) {
    case 1001:
      return { ...plain, minWindow: b.restartWindow };
    case 1013:
      return { ...plain, floor: b.slowDelay, minWindow: b.slowDelay };
    case 1008:
      if (/token expired/i.test(reason)) {
        if (opts.canRefreshToken) return { ...plain, refreshToken: true };
        return { ...plain, reconnect: false, error: "token_expired" };
      }
      if (opts.reconnectOnPolicyClose) return { ...plain, floor: b.slowDelay, minWindow: b.slowDelay };
      return { ...plain, reconnect: false, error: "policy_close" };
    default:
      return plain;
  }
}

/** The `exp` claim of a JWT in milliseconds, or undefined (not a JWT, or no exp). */
export function jwtExpiry(token) {
  try {
    const part = String(token).split(".")[1];
    if (!part) return undefined;
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const json = JSON.parse(atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4)));
    return typeof json.exp === "number" ? json.exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

class WsgateEvent extends Event {
  constructor(type, detail) {
    super(type);
    this.detail = detail;
  }
}

/**
 * A wsgate connection that reconnects by itself.
 *
 * Events (EventTarget, `event.detail`; or `client.on(type, (detail) => ...)`):
 *  - `open`        {attempt}: the WebSocket handshake succeeded (not yet usable)
 *  - `welcome`     {user, conn, reconnected, rooms}: ready; rooms of before are re-joined
 *  - `message`     {from?, room?, data}: a delivery
 *  - `close`       {code, reason, wasClean, willReconnect}
 *  - `reconnecting`{attempt, delay, code}: a reconnect is scheduled in `delay` ms
 *  - `error`       {error}: an error not tied to a request (e.g. a room that could not be re-joined)
 */
export class WsgateClient extends EventTarget {
  constructor(options = {}) {
    super();
    if (!options.url) throw new TypeError("WsgateClient: options.url is required");
    this._WS = options.WebSocket || globalThis.WebSocket;
    if (typeof this._WS !== "function") {
      throw new TypeError(
        "WsgateClient: no WebSocket constructor (use Node >= 22, node --experimental-websocket, or pass options.WebSocket)",
      );
    }
    this._url = options.url;
    this._userParam = options.user;
    this._token = options.token;
    this._getToken = options.getToken;
    this._backoff = { ...DEFAULT_BACKOFF, ...(options.backoff || {}) };
    this._requestTimeout = options.requestTimeout ?? 10000;
    this._connectTimeout = options.connectTimeout ?? 10000;
    this._reconnectOnPolicyClose = !!options.reconnectOnPolicyClose;
    this._queueLimit = options.queueLimit ?? 0;
    this._random = options.random || Math.random;
    this._autoReconnect = options.reconnect ?? true;

    this._ws = null;
    this._listeners = new WeakMap(); // on() callbacks -> (type -> wrapped listener)
    this._closedByUser = false;
    this._state = "idle"; // idle | connecting | joining | open | waiting | closed
    this._stopped = false;
    this._started = false;
    this._attempt = 0; // failed attempts since the last welcome
    this._connects = 0; // successful welcomes
    this._nextId = 1;
    this._pending = new Map(); // id -> {resolve, reject, timer, msg, ws}
    this._queue = []; // requests made while disconnected (when queueLimit > 0)
    this._rooms = new Set(); // rooms this client wants to be in (re-joined on reconnect)
    this._roomSeq = new Map(); // room -> seq of the last join/leave asked for it
    this._seq = 0;
    this._refreshToken = false;
    this._waiters = []; // connect() promises
    this._timer = null; // reconnect timer
    this._connectTimer = null;
    this.user = undefined;
    this.conn = undefined;
    this._onOnline = () => {
      if (this._state === "waiting") {
        clearTimeout(this._timer);
        this._open();
      }
    };
  }

  /** idle | connecting | joining | open | waiting | closed */
  get state() {
    return this._state;
  }

  /** True when requests go out at once (welcome received, rooms re-joined or re-joining). */
  get connected() {
    return this._state === "open";
  }

  /** The rooms this client is in (and re-joins after a reconnect). */
  get rooms() {
    return [...this._rooms];
  }

  /** `on(type, fn)`: fn(detail, event). Returns a function that removes the listener. */
  on(type, fn) {
    const key = `${type}`;
    let byType = this._listeners.get(fn);
    if (!byType) this._listeners.set(fn, (byType = new Map()));
    if (!byType.has(key)) {
      const l = (ev) => fn(ev.detail, ev);
      byType.set(key, l);
      this.addEventListener(key, l);
    }
    return () => this.off(type, fn);
  }

  off(type, fn) {
    const byType = this._listeners.get(fn);
    const l = byType && byType.get(`${type}`);
    if (l) {
      this.removeEventListener(`${type}`, l);
      byType.delete(`${type}`);
    }
  }

  _emit(type, detail) {
    this.dispatchEvent(new WsgateEvent(type, detail));
  }

  /**
   * Starts connecting (and keeps reconnecting). Resolves with {user, conn} at the next
   * welcome; rejects if the client is closed or the server refuses for good first.
   */
  connect() {
    if (this._closedByUser) return Promise.reject(new WsgateError("client_closed", "the client was closed"));
    if (this._stopped) {
      // Stopped by the server's policy (kicked, token expired): an explicit connect() starts over.
      this._stopped = false;
      this._attempt = 0;
      this._started = false;
    }
    const p = new Promise((resolve, reject) => {
      if (this._state === "open") resolve({ user: this.user, conn: this.conn });
      else this._waiters.push({ resolve, reject });
    });
    if (!this._started) {
      this._started = true;
      if (typeof globalThis.addEventListener === "function" && typeof navigator !== "undefined") {
        globalThis.addEventListener("online", this._onOnline);
      }
      this._open();
    } else if (this._state === "waiting") {
      clearTimeout(this._timer);
      this._open();
    }
    return p;
  }

  /** Stops for good: closes the connection, rejects what is pending, never reconnects. */
  close(code = 1000, reason = "") {
    if (this._closedByUser) return;
    this._closedByUser = true;
    this._stopped = true;
    clearTimeout(this._timer);
    clearTimeout(this._connectTimer);
    if (typeof globalThis.removeEventListener === "function") {
      globalThis.removeEventListener("online", this._onOnline);
    }
    const err = () => new WsgateError("client_closed", "the client was closed");
    this._failPending(null, err);
    for (const q of this._queue.splice(0)) q.reject(err());
    for (const w of this._waiters.splice(0)) w.reject(err());
    const ws = this._ws;
    this._state = "closed";
    if (ws) {
      try {
        ws.close(code, reason);
      } catch {
        ws.close();
      }
    }
  }

  /** Sends `data` to every connection of user `to`. Resolves with {delivered}. */
  send(to, data) {
    return this._request({ type: "send", to, data });
  }

  /** Publishes `data` to every member connection of `room`. Resolves with {delivered}. */
  publish(room, data) {
    return this._request({ type: "publish", room, data });
  }

  /** Joins `room`; it is re-joined after every reconnect until leave(). Resolves with {}. */
  join(room) {
    const seq = ++this._seq;
    this._roomSeq.set(room, seq);
    return this._request({ type: "join", room }).then((r) => {
      if (this._roomSeq.get(room) === seq) this._rooms.add(room);
      return r;
    });
  }

  /** Leaves `room`. While disconnected (and no offline queue) resolves at once: a reconnect
   * is a new connection, a member of nothing until it joins. */
  leave(room) {
    this._roomSeq.set(room, ++this._seq);
    this._rooms.delete(room);
    if (this._state !== "open" && this._state !== "joining" && this._queueLimit === 0 && !this._stopped) {
      return Promise.resolve({});
    }
    return this._request({ type: "leave", room });
  }

  // ---- internals ----

  _request(msg) {
    if (this._stopped) return Promise.reject(new WsgateError("client_closed", "the client was closed", msg));
    return new Promise((resolve, reject) => {
      const item = { msg, resolve, reject };
      if (this._state === "open" || this._state === "joining") this._transmit(item, this._ws);
      else if (this._queue.length < this._queueLimit) this._queue.push(item);
      else {
        const why = this._queueLimit > 0 ? "the offline queue is full" : "not connected";
        reject(new WsgateError("not_connected", why, msg));
      }
    });
  }

  _transmit(item, ws) {
    const id = this._nextId++;
    const wire = { ...item.msg, id };
    const entry = { ...item, ws };
    entry.timer = setTimeout(() => {
      if (this._pending.get(id) === entry) {
        this._pending.delete(id);
        item.reject(new WsgateError("timeout", `no answer to ${item.msg.type} within ${this._requestTimeout} ms`, item.msg));
      }
    }, this._requestTimeout);
    this._pending.set(id, entry);
    try {
      ws.send(JSON.stringify(wire));
    } catch (e) {
      clearTimeout(entry.timer);
      this._pending.delete(id);
      item.reject(new WsgateError("connection_closed", String(e && e.message ? e.message : e), item.msg));
    }
  }

  _failPending(ws, makeErr) {
    for (const [id, p] of this._pending) {
      if (ws === null || p.ws === ws) {
        clearTimeout(p.timer);
        this._pending.delete(id);
        p.reject(makeErr(p.msg));
      }
    }
  }

  async _connectUrl() {
    let token = this._token;
    const exp = token ? jwtExpiry(token) : undefined;
    const expired = exp !== undefined && exp <= Date.now();
    if (this._getToken && (!token || this._refreshToken || expired)) {
      token = await this._getToken();
      this._token = token;
      this._refreshToken = false;
    } else if (expired) {
      throw new WsgateError("token_expired", "the token has expired and there is no getToken to renew it");
    }
    const base =
      typeof location !== "undefined" && !/^wss?:|^https?:/i.test(this._url)
        ? new URL(this._url, location.href)
        : new URL(this._url);
    if (base.protocol === "http:") base.protocol = "ws:";
    if (base.protocol === "https:") base.protocol = "wss:";
    if (token) base.searchParams.set("token", token);
    else if (this._userParam !== undefined) base.searchParams.set("user", this._userParam);
    return base.toString();
  }

  async _open() {
    if (this._stopped) return;
    this._state = "connecting";
    const gen = (this._gen = (this._gen || 0) + 1);
    let url;
    try {
      url = await this._connectUrl();
    } catch (e) {
      if (this._stopped || gen !== this._gen) return;
      const error = e instanceof WsgateError ? e : new WsgateError("token_error", `getToken failed: ${e && e.message}`);
      if (error.code === "token_expired") return this._stop(error);
      this._emit("error", { error });
      return this._schedule({ reconnect: true, floor: 0, minWindow: 0 }, 1006);
    }
    if (this._stopped || gen !== this._gen) return;
    let ws;
    try {
      ws = new this._WS(url);
    } catch (e) {
      this._emit("error", { error: e });
      return this._schedule({ reconnect: true, floor: 0, minWindow: 0 }, 1006);
    }
    this._ws = ws;
    let welcomed = false;
    this._connectTimer = setTimeout(() => {
      if (this._ws === ws && !welcomed) {
        try {
          ws.close();
        } catch {
          /* ignore */
        }
        this._onClose(ws, { code: 1006, reason: "connect timeout", wasClean: false }, false);
      }
    }, this._connectTimeout);
    ws.onopen = () => {
      if (this._ws === ws) this._emit("open", { attempt: this._attempt });
    };
    ws.onerror = () => {}; // a close event always follows
    ws.onclose = (ev) => this._onClose(ws, ev, welcomed);
    ws.onmessage = (ev) => {
      if (this._ws !== ws || typeof ev.data !== "string") return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        this._emit("error", { error: new WsgateError("bad_frame", "the server sent a frame that is not JSON") });
        return;
      }
      if (!msg || typeof msg !== "object") return;
      switch (msg.type) {
        case "welcome":
          welcomed = true;
          clearTimeout(this._connectTimer);
          this.user = msg.user;
          this.conn = msg.conn;
          this._rejoin(ws, msg);
          break;
        case "message": {
          const m = {};
          if ("from" in msg) m.from = msg.from;
          if ("room" in msg) m.room = msg.room;
          m.data = msg.data;
          this._emit("message", m);
          break;
        }
        case "ack": {
          const p = this._pending.get(msg.id);
          if (!p) return;
          this._pending.delete(msg.id);
          clearTimeout(p.timer);
          const { type: _t, id: _i, ...rest } = msg;
          p.resolve(rest);
          break;
        }
        case "error": {
          const err = new WsgateError(msg.code, msg.message);
          const p = msg.id !== undefined ? this._pending.get(msg.id) : undefined;
          if (p) {
            this._pending.delete(msg.id);
            clearTimeout(p.timer);
            err.request = p.msg;
            p.reject(err);
          } else this._emit("error", { error: err });
          break;
        }
        default:
          break;
      }
    };
  }

  async _rejoin(ws, welcome) {
    this._state = "joining";
    const rooms = [...this._rooms];
    const reconnected = this._connects > 0;
    const results = await Promise.allSettled(
      rooms.map(
        (room) =>
          new Promise((resolve, reject) => this._transmit({ msg: { type: "join", room }, resolve, reject }, ws)),
      ),
    );
    if (this._ws !== ws || this._stopped) return;
    let retry = false;
    results.forEach((r, i) => {
      if (r.status === "fulfilled") return;
      const code = r.reason && r.reason.code;
      if (code === "timeout" || code === "connection_closed" || code === "rate_limited") retry = true;
      else {
        // The server refused the room itself (bad_room, too_many_rooms): drop it.
        this._rooms.delete(rooms[i]);
        this._emit("error", { error: r.reason, room: rooms[i] });
      }
    });
    if (retry) {
      // Not all rooms are back: start over on a new connection rather than run half-joined.
      this._emit("error", { error: new WsgateError("timeout", "re-joining rooms failed; reconnecting") });
      try {
        ws.close(4001, "rejoin failed");
      } catch {
        ws.close();
      }
      this._onClose(ws, { code: 1006, reason: "rejoin failed", wasClean: false }, true);
      return;
    }
    this._state = "open";
    this._attempt = 0;
    this._connects++;
    const info = { user: welcome.user, conn: welcome.conn };
    for (const q of this._queue.splice(0)) this._transmit(q, ws);
    this._emit("welcome", { ...info, reconnected, rooms: [...this._rooms] });
    for (const w of this._waiters.splice(0)) w.resolve(info);
  }

  _onClose(ws, ev, welcomed) {
    if (this._ws !== ws) return;
    this._ws = null;
    clearTimeout(this._connectTimer);
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    const code = ev.code ?? 1006;
    const reason = ev.reason || "";
    this._failPending(ws, (msg) => new WsgateError("connection_closed", `connection closed (${code}) before the answer`, msg));
    if (this._stopped) {
      this._state = "closed";
      this._emit("close", { code, reason, wasClean: !!ev.wasClean, willReconnect: false });
      return;
    }
    // A connection that never got its welcome may have been refused (401 looks like 1006 to a
    // browser): fetch a fresh token before the next try.
    if (!welcomed && this._getToken) this._refreshToken = true;
    const policy = this._autoReconnect
      ? closePolicy(code, reason, {
          backoff: this._backoff,
          canRefreshToken: !!this._getToken,
          reconnectOnPolicyClose: this._reconnectOnPolicyClose,
        })
      : { reconnect: false };
    if (policy.refreshToken) this._refreshToken = true;
    this._emit("close", { code, reason, wasClean: !!ev.wasClean, willReconnect: !!policy.reconnect });
    if (!policy.reconnect) {
      const error = policy.error
        ? new WsgateError(policy.error, `closed by the server (${code} ${reason}); not reconnecting`)
        : new WsgateError("connection_closed", `closed (${code} ${reason})`);
      this._stop(error);
      return;
    }
    this._schedule(policy, code);
  }

  _stop(error) {
    this._stopped = true;
    this._state = "closed";
    clearTimeout(this._timer);
    for (const q of this._queue.splice(0)) q.reject(error);
    for (const w of this._waiters.splice(0)) w.reject(error);
    if (error.code !== "connection_closed") this._emit("error", { error });
  }

  _schedule(policy, code) {
    this._state = "waiting";
    const delay = reconnectDelay(this._attempt, this._backoff, this._random, policy);
    this._attempt++;
    this._emit("reconnecting", { attempt: this._attempt, delay, code });
    clearTimeout(this._timer);
    this._timer = setTimeout(() => this._open(), delay);
  }
}

export default WsgateClient;
