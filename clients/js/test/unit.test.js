// Unit tests: the delay function and the close policy (pure), then the client's state machine
// against a scripted fake WebSocket (no network).
import test from "node:test";
import assert from "node:assert/strict";
import {
  WsgateClient,
  WsgateError,
  reconnectDelay,
  closePolicy,
  jwtExpiry,
  DEFAULT_BACKOFF,
} from "../wsgate.js";
import { waitFor, nextEvent, mintJwt } from "./helpers.js";

/** A seeded PRNG (mulberry32): repeatable "random" numbers in [0, 1). */
function seeded(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function histogram(values, lo, width, buckets) {
  const h = new Array(buckets).fill(0);
  for (const v of values) {
    const i = Math.floor((v - lo) / width);
    assert.ok(i >= 0 && i < buckets, `value ${v} outside [${lo}, ${lo + width * buckets})`);
    h[i]++;
  }
  return h;
}

test("full jitter: 1000 clients' first retries are spread evenly over the window", () => {
  const random = seeded(42);
  const delays = Array.from({ length: 1000 }, () => reconnectDelay(0, DEFAULT_BACKOFF, random));
  // Window = initial = 1000 ms, cut in ten 100 ms slices: each holds about 100 clients.
  const h = histogram(delays, 0, 100, 10);
  for (const n of h) assert.ok(n >= 60 && n <= 140, `uneven spread ${h}`);
  assert.ok(Math.max(...delays) - Math.min(...delays) > 950);
});

test("full jitter after a server restart (1001): 1000 clients over 5 s, no second gets more than a quarter", () => {
  const random = seeded(7);
  const p = closePolicy(1001, "server shutting down");
  const delays = Array.from({ length: 1000 }, () => reconnectDelay(0, DEFAULT_BACKOFF, random, p));
  const perSecond = histogram(delays, 0, 1000, 5);
  for (const n of perSecond) assert.ok(n >= 150 && n <= 250, `uneven spread per second ${perSecond}`);
});

test("the window grows by factor per attempt and is capped at max", () => {
  const b = { initial: 100, max: 3000, factor: 2 };
  const top = () => 0.999999;
  assert.ok(Math.abs(reconnectDelay(0, b, top) - 100) < 1);
  assert.ok(Math.abs(reconnectDelay(3, b, top) - 800) < 1);
  assert.ok(Math.abs(reconnectDelay(20, b, top) - 3000) < 1);
  assert.equal(reconnectDelay(20, b, () => 0), 0); // full jitter: may be 0
  // Spread at a capped attempt covers the whole window too.
  const random = seeded(1);
  const d = Array.from({ length: 1000 }, () => reconnectDelay(12, b, random));
  const h = histogram(d, 0, 300, 10);
  for (const n of h) assert.ok(n >= 60 && n <= 140, `uneven ${h}`);
});

test("1013 (slow consumer / overloaded) waits at least slowDelay, spread over another slowDelay", () => {
  const p = closePolicy(1013, "slow consumer");
  assert.equal(p.reconnect, true);
  const random = seeded(3);
  const d = Array.from({ length: 1000 }, () => reconnectDelay(0, DEFAULT_BACKOFF, random, p));
  assert.ok(Math.min(...d) >= DEFAULT_BACKOFF.slowDelay);
  const h = histogram(d, 5000, 1000, 5);
  for (const n of h) assert.ok(n >= 150 && n <= 250, `uneven ${h}`);
});

test("close policy by code", () => {
  assert.deepEqual(closePolicy(4000, "idle timeout"), { reconnect: true, refreshToken: false, floor: 0, minWindow: 0 });
  assert.equal(closePolicy(1006, "").reconnect, true);
  assert.equal(closePolicy(1011, "").reconnect, true);
  assert.equal(closePolicy(1001, "server shutting down").minWindow, DEFAULT_BACKOFF.restartWindow);
  // Kicked by the API / rate-limit abuse: stop, unless configured to reconnect.
  const kicked = closePolicy(1008, "disconnected by the server");
  assert.equal(kicked.reconnect, false);
  assert.equal(kicked.error, "policy_close");
  const rate = closePolicy(1008, "rate limit exceeded", { reconnectOnPolicyClose: true });
  assert.equal(rate.reconnect, true);
  assert.ok(rate.floor >= DEFAULT_BACKOFF.slowDelay);
  // Token expired: refresh when possible, else stop.
  assert.deepEqual(
    { ...closePolicy(1008, "token expired", { canRefreshToken: true }) },
    { reconnect: true, refreshToken: true, floor: 0, minWindow: 0 },
  );
  assert.equal(closePolicy(1008, "token expired").reconnect, false);
  assert.equal(closePolicy(1008, "token expired").error, "token_expired");
  // Custom backoff flows into the policy.
  assert.equal(closePolicy(1013, "", { backoff: { slowDelay: 9000 } }).floor, 9000);
});

test("jwtExpiry reads exp from a JWT", () => {
  assert.equal(jwtExpiry(mintJwt("s", { sub: "a", exp: 1700000000 })), 1700000000000);
  assert.equal(jwtExpiry(mintJwt("s", { sub: "a" })), undefined);
  assert.equal(jwtExpiry("not a jwt"), undefined);
});

// ---- the client against a fake WebSocket ----

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
    queueMicrotask(() => {
      if (this.readyState !== 0) return;
      this.readyState = 1;
      this.onopen && this.onopen({});
    });
  }
  send(text) {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(JSON.parse(text));
  }
  close(code = 1005, reason = "") {
    if (this.readyState >= 2) return;
    this.readyState = 2;
    queueMicrotask(() => this.serverClose(code, reason, true));
  }
  // ---- driven by the test, as the server ----
  receive(obj) {
    this.onmessage && this.onmessage({ data: JSON.stringify(obj) });
  }
  welcome(user = "u") {
    this.receive({ type: "welcome", user, conn: `c${FakeSocket.all.indexOf(this)}` });
  }
  serverClose(code, reason = "", wasClean = true) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose && this.onclose({ code, reason, wasClean });
  }
  ackAll() {
    for (const m of this.sent.splice(0)) {
      this.receive(m.type === "send" || m.type === "publish" ? { type: "ack", id: m.id, delivered: 1 } : { type: "ack", id: m.id });
    }
  }
}

function fakeClient(opts = {}) {
  FakeSocket.all = [];
  return new WsgateClient({
    url: "ws://gateway.test/ws",
    user: "u",
    WebSocket: FakeSocket,
    backoff: { initial: 10, max: 40, factor: 2, restartWindow: 20, slowDelay: 200 },
    requestTimeout: 200,
    ...opts,
  });
}
const lastSocket = () => FakeSocket.all[FakeSocket.all.length - 1];
const socketCount = (n) => waitFor(() => FakeSocket.all.length >= n, { timeout: 3000, what: `${n} sockets` });

test("fake: url carries ?user=, requests resolve on ack and reject on error", async () => {
  const c = fakeClient();
  const ready = c.connect();
  await socketCount(1);
  const s = lastSocket();
  assert.equal(s.url, "ws://gateway.test/ws?user=u");
  s.welcome();
  assert.deepEqual(await ready, { user: "u", conn: "c0" });
  const p = c.send("v", { x: 1 });
  assert.deepEqual(s.sent[0], { type: "send", to: "v", data: { x: 1 }, id: s.sent[0].id });
  s.receive({ type: "ack", id: s.sent[0].id, delivered: 3 });
  assert.deepEqual(await p, { delivered: 3 });
  const q = c.join("bad room");
  s.receive({ type: "error", id: s.sent[1].id, code: "bad_room", message: "invalid room" });
  await assert.rejects(q, (e) => e instanceof WsgateError && e.code === "bad_room" && e.request.room === "bad room");
  c.close();
});

test("fake: timeout, and pending requests rejected when the connection drops", async () => {
  const c = fakeClient();
  c.connect();
  await socketCount(1);
  lastSocket().welcome();
  await waitFor(() => c.connected);
  await assert.rejects(c.publish("r", 1), (e) => e.code === "timeout");
  const p = c.send("v", 2);
  lastSocket().serverClose(1006, "", false);
  await assert.rejects(p, (e) => e.code === "connection_closed");
  c.close();
});

test("fake: requests while disconnected reject, or wait in a bounded queue", async () => {
  const c = fakeClient();
  await assert.rejects(c.send("v", 1), (e) => e.code === "not_connected");
  c.close();
  const q = fakeClient({ queueLimit: 2 });
  const p1 = q.send("v", 1);
  const p2 = q.publish("r", 2);
  await assert.rejects(q.send("v", 3), (e) => e.code === "not_connected");
  q.connect();
  await socketCount(1);
  const s = lastSocket();
  s.welcome();
  await waitFor(() => s.sent.length === 2);
  assert.deepEqual(s.sent.map((m) => m.data), [1, 2]); // in order
  s.ackAll();
  assert.deepEqual(await p1, { delivered: 1 });
  assert.deepEqual(await p2, { delivered: 1 });
  q.close();
});

test("fake: rooms are re-joined before welcome is emitted; leave stops the re-join", async () => {
  const c = fakeClient();
  c.connect();
  await socketCount(1);
  let s = lastSocket();
  s.welcome();
  await waitFor(() => c.connected);
  const j = [c.join("a"), c.join("b"), c.join("c")];
  s.ackAll();
  await Promise.all(j);
  const l = c.leave("b");
  s.ackAll();
  await l;
  assert.deepEqual(c.rooms.sort(), ["a", "c"]);
  let welcomes = 0;
  c.on("welcome", (w) => {
    welcomes++;
    assert.equal(w.reconnected, true);
    assert.deepEqual(w.rooms.sort(), ["a", "c"]);
  });
  s.serverClose(1001, "server shutting down");
  await socketCount(2);
  s = lastSocket();
  s.welcome();
  await waitFor(() => s.sent.length === 2);
  assert.deepEqual(s.sent.map((m) => [m.type, m.room]).sort(), [["join", "a"], ["join", "c"]]);
  assert.equal(welcomes, 0, "welcome must wait for the re-joins");
  assert.equal(c.state, "joining");
  s.ackAll();
  await waitFor(() => welcomes === 1);
  assert.equal(c.state, "open");
  c.close();
});

test("fake: a room the server refuses on re-join is dropped with an error event", async () => {
  const c = fakeClient();
  c.connect();
  await socketCount(1);
  let s = lastSocket();
  s.welcome();
  await waitFor(() => c.connected);
  const j = c.join("x");
  s.ackAll();
  await j;
  const errs = [];
  c.on("error", (e) => errs.push(e));
  s.serverClose(4000, "idle timeout");
  await socketCount(2);
  s = lastSocket();
  s.welcome();
  await waitFor(() => s.sent.length === 1);
  s.receive({ type: "error", id: s.sent[0].id, code: "too_many_rooms", message: "" });
  await waitFor(() => c.connected);
  assert.deepEqual(c.rooms, []);
  assert.equal(errs[0].error.code, "too_many_rooms");
  assert.equal(errs[0].room, "x");
  c.close();
});

test("fake: 1013 reconnects no sooner than slowDelay", async () => {
  const c = fakeClient();
  c.connect();
  await socketCount(1);
  lastSocket().welcome();
  await waitFor(() => c.connected);
  const ev = nextEvent(c, "reconnecting", { timeout: 2000 });
  const closed = nextEvent(c, "close", { timeout: 2000 });
  const t0 = Date.now();
  lastSocket().serverClose(1013, "slow consumer");
  assert.deepEqual(await closed, { code: 1013, reason: "slow consumer", wasClean: true, willReconnect: true });
  const r = await ev;
  assert.ok(r.delay >= 200 && r.delay < 400, `delay ${r.delay}`);
  await socketCount(2);
  assert.ok(Date.now() - t0 >= 195, "reconnected too early");
  c.close();
});

test("fake: 1008 kicked stops (error policy_close); connect() starts again", async () => {
  const c = fakeClient();
  c.connect();
  await socketCount(1);
  lastSocket().welcome();
  await waitFor(() => c.connected);
  const err = nextEvent(c, "error", { timeout: 2000 });
  const closed = nextEvent(c, "close", { timeout: 2000 });
  lastSocket().serverClose(1008, "disconnected by the server");
  assert.equal((await closed).willReconnect, false);
  assert.equal((await err).error.code, "policy_close");
  assert.equal(c.state, "closed");
  await assert.rejects(c.send("v", 1), (e) => e.code === "client_closed");
  const again = c.connect();
  await socketCount(2);
  lastSocket().welcome();
  await again;
  c.close();
});

test("fake: 1008 token expired calls getToken, then reconnects with the new token", async () => {
  let n = 0;
  const c = fakeClient({ user: undefined, getToken: async () => `tok${++n}` });
  c.connect();
  await socketCount(1);
  assert.equal(lastSocket().url, "ws://gateway.test/ws?token=tok1");
  lastSocket().welcome();
  await waitFor(() => c.connected);
  lastSocket().serverClose(4000, "idle timeout");
  await socketCount(2);
  assert.equal(lastSocket().url, "ws://gateway.test/ws?token=tok1", "no refresh for a plain reconnect");
  lastSocket().welcome();
  await waitFor(() => c.connected);
  lastSocket().serverClose(1008, "token expired");
  await socketCount(3);
  assert.equal(lastSocket().url, "ws://gateway.test/ws?token=tok2");
  // A connection refused before its welcome (a 401 looks like 1006) also refreshes.
  lastSocket().serverClose(1006, "", false);
  await socketCount(4);
  assert.equal(lastSocket().url, "ws://gateway.test/ws?token=tok3");
  c.close();
});

test("fake: an expired static token without getToken stops with token_expired", async () => {
  const c = fakeClient({ user: undefined, token: mintJwt("s", { sub: "u", exp: Math.floor(Date.now() / 1000) - 10 }) });
  const err = nextEvent(c, "error", { timeout: 2000 });
  await assert.rejects(c.connect(), (e) => e.code === "token_expired");
  assert.equal((await err).error.code, "token_expired");
  assert.equal(FakeSocket.all.length, 0);
});

test("fake: close() stops for good, also while a reconnect is scheduled", async () => {
  const c = fakeClient({ backoff: { initial: 100, max: 100, factor: 1 } });
  c.connect();
  await socketCount(1);
  lastSocket().welcome();
  await waitFor(() => c.connected);
  const sched = nextEvent(c, "reconnecting", { timeout: 2000 });
  lastSocket().serverClose(1006, "", false);
  const { delay } = await sched;
  c.close();
  assert.equal(c.state, "closed");
  // Wait past the scheduled time (bounded), then check nothing reconnected.
  await new Promise((r) => setTimeout(r, delay + 50));
  assert.equal(FakeSocket.all.length, 1);
  await assert.rejects(c.connect(), (e) => e.code === "client_closed");
});

test("fake: the first connection failing keeps retrying with growing windows", async () => {
  const c = fakeClient({ random: () => 0.5 });
  const delays = [];
  c.on("reconnecting", (r) => delays.push(r.delay));
  const ready = c.connect();
  for (let i = 1; i <= 4; i++) {
    await socketCount(i);
    lastSocket().serverClose(1006, "", false);
  }
  await socketCount(5);
  lastSocket().welcome();
  await ready;
  assert.deepEqual(delays, [5, 10, 20, 20]); // 0.5 * min(40, 10 * 2^n)
  c.close();
});

test("on/off: one function on two clients and two types, removed independently", () => {
  const a = fakeClient();
  const b = fakeClient();
  const seen = [];
  const fn = (d) => seen.push(d.n);
  a.on("x", fn);
  a.on("y", fn);
  const offB = b.on("x", fn);
  a.on("x", fn); // twice: still one listener
  const fire = (c, type, n) => c.dispatchEvent(Object.assign(new Event(type), { detail: { n } }));
  fire(a, "x", 1);
  fire(a, "y", 2);
  fire(b, "x", 3);
  a.off("x", fn);
  fire(a, "x", 4);
  fire(a, "y", 5);
  offB();
  fire(b, "x", 6);
  assert.deepEqual(seen, [1, 2, 3, 5]);
});
