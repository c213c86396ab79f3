// The client against the real gateway (dev mode, ?user=), started on port 0.
import test, { before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { WsgateError } from "../wsgate.js";
import { Gateway, client, closeAll, waitFor, nextEvent, inbox } from "./helpers.js";

let gw;
before(async () => {
  gw = await new Gateway().start();
});
afterEach(() => closeAll());
after(async () => {
  closeAll();
  await gw.stop("SIGTERM");
});

async function connected(user, opts = {}) {
  const c = client(gw, { user, ...opts });
  const w = await c.connect();
  assert.equal(w.user, user);
  assert.equal(typeof w.conn, "string");
  return c;
}

test("send: ack with the exact delivered count, message shape, data passed through", async () => {
  const alice = await connected("alice");
  const bob1 = await connected("bob");
  const bob2 = await connected("bob");
  const in1 = inbox(bob1);
  const in2 = inbox(bob2);
  const data = { text: "hi", n: [1, 2.5, null, true], nested: { "ü": "\u2603" } };
  assert.deepEqual(await alice.send("bob", data), { delivered: 2 });
  await waitFor(() => in1.length === 1 && in2.length === 1, { what: "both of bob's connections" });
  assert.deepEqual(in1[0], { from: "alice", data }); // a direct message has no room key
  assert.ok(!("room" in in1[0]));
  assert.deepEqual(in2[0], { from: "alice", data });
  assert.deepEqual(await alice.send("nobody-online", 1), { delivered: 0 });
  assert.deepEqual(await alice.send("alice", null), { delivered: 1 }); // own connections count
});

test("order: many sends arrive in order", async () => {
  const a = await connected("ord-a");
  const b = await connected("ord-b");
  const got = inbox(b);
  const acks = await Promise.all(Array.from({ length: 200 }, (_, i) => a.send("ord-b", i)));
  assert.ok(acks.every((x) => x.delivered === 1));
  await waitFor(() => got.length === 200, { what: "200 messages" });
  assert.deepEqual(got.map((m) => m.data), Array.from({ length: 200 }, (_, i) => i));
});

test("rooms: join, publish with exact delivered counts, leave", async () => {
  const a = await connected("room-a");
  const b = await connected("room-b");
  const outsider = await connected("room-c");
  const ina = inbox(a);
  const inb = inbox(b);
  assert.deepEqual(await a.join("lobby"), {});
  assert.deepEqual(await b.join("lobby"), {});
  assert.deepEqual(await outsider.publish("lobby", "from outside"), { delivered: 2 });
  assert.deepEqual(await a.publish("lobby", { n: 1 }), { delivered: 2 }); // a is a member too
  await waitFor(() => ina.length === 2 && inb.length === 2, { what: "room messages" });
  assert.deepEqual(inb, [
    { from: "room-c", room: "lobby", data: "from outside" },
    { from: "room-a", room: "lobby", data: { n: 1 } },
  ]);
  assert.deepEqual(await b.leave("lobby"), {});
  assert.deepEqual(b.rooms, []);
  assert.deepEqual(await outsider.publish("lobby", 3), { delivered: 1 });
  assert.deepEqual(await outsider.publish("empty-room", 3), { delivered: 0 });
});

test("errors reject the request with the server's code; the connection stays usable", async () => {
  const a = await connected("err-a");
  await assert.rejects(a.send("bad user!", 1), (e) => e instanceof WsgateError && e.code === "bad_user");
  await assert.rejects(a.join(""), (e) => e.code === "bad_room");
  await assert.rejects(a.publish("x".repeat(129), 1), (e) => e.code === "bad_room");
  await assert.rejects(a.send("err-a", undefined), (e) => e.code === "bad_request"); // data missing
  assert.deepEqual(await a.send("err-a", 1), { delivered: 1 });
  assert.equal(a.state, "open");
});

test("a backend API message has no from", async () => {
  const a = await connected("api-target");
  const got = inbox(a);
  const r = await gw.api("POST", "/api/send", { to: "api-target", data: { order: 42 } });
  assert.deepEqual(r.body, { delivered: 1 });
  await waitFor(() => got.length === 1);
  assert.deepEqual(got[0], { data: { order: 42 } });
});

test("kicked by the API (1008): no reconnect unless configured", async () => {
  const kicked = await connected("kick-me");
  const err = nextEvent(kicked, "error");
  const closed = nextEvent(kicked, "close");
  assert.deepEqual((await gw.api("POST", "/api/disconnect", { user: "kick-me" })).body, { closed: 1 });
  const c = await closed;
  assert.equal(c.code, 1008);
  assert.equal(c.willReconnect, false);
  assert.equal((await err).error.code, "policy_close");
  await waitFor(async () => (await gw.presence("kick-me")) === 0, { what: "presence 0" });
  assert.equal(kicked.state, "closed");

  const stubborn = await connected("kick-me-too", { reconnectOnPolicyClose: true });
  const back = nextEvent(stubborn, "welcome", { filter: (w) => w.reconnected });
  await gw.api("POST", "/api/disconnect", { user: "kick-me-too" });
  await back;
  assert.equal(await gw.presence("kick-me-too"), 1);
});

test("close() closes the connection and never reconnects", async () => {
  const c = await connected("closer");
  const witness = await connected("witness");
  const events = [];
  c.on("reconnecting", (r) => events.push(r));
  const closed = nextEvent(c, "close");
  c.close();
  const ev = await closed;
  assert.equal(ev.willReconnect, false);
  await waitFor(async () => (await gw.presence("closer")) === 0, { what: "closer gone" });
  await assert.rejects(c.send("witness", 1), (e) => e.code === "client_closed");
  // Bounce the gateway: the witness (same backoff) comes back; the closed client must not.
  const back = nextEvent(witness, "welcome", { filter: (w) => w.reconnected, timeout: 15000 });
  await gw.restart();
  await back;
  assert.equal(await gw.presence("witness"), 1);
  assert.equal(await gw.presence("closer"), 0);
  assert.deepEqual(events, []);
});

test("gateway killed and restarted on the same port: clients reconnect and are back in their rooms", async () => {
  const a = await connected("rj-a");
  const b = await connected("rj-b");
  await a.join("room1");
  await a.join("room2");
  await b.join("room1");
  const inb = inbox(b);
  const closes = [];
  b.on("close", (c) => closes.push(c));
  const port = gw.port;
  const backA = nextEvent(a, "welcome", { filter: (w) => w.reconnected, timeout: 15000 });
  const backB = nextEvent(b, "welcome", { filter: (w) => w.reconnected, timeout: 15000 });
  await gw.restart("SIGKILL");
  assert.equal(gw.port, port);
  const wa = await backA;
  const wb = await backB;
  assert.deepEqual(wa.rooms.sort(), ["room1", "room2"]);
  assert.deepEqual(wb.rooms, ["room1"]);
  assert.equal(closes[0].code, 1006); // killed: no close frame
  assert.equal(closes[0].willReconnect, true);
  // Rooms were re-joined before welcome: a publish right now reaches both members.
  assert.deepEqual(await a.publish("room1", "after restart"), { delivered: 2 });
  assert.deepEqual(await a.publish("room2", "only a"), { delivered: 1 });
  await waitFor(() => inb.some((m) => m.data === "after restart"), { what: "room message after restart" });
  assert.deepEqual(await b.send("rj-a", "direct"), { delivered: 1 });
});

test("graceful restart (1001): clients reconnect, spread over the restart window", async () => {
  const a = await connected("gr-a");
  await a.join("g");
  const closed = nextEvent(a, "close", { timeout: 15000 });
  const sched = nextEvent(a, "reconnecting", { timeout: 15000 });
  const back = nextEvent(a, "welcome", { filter: (w) => w.reconnected, timeout: 15000 });
  await gw.restart("SIGTERM");
  assert.equal((await closed).code, 1001);
  const r = await sched;
  assert.ok(r.delay >= 0 && r.delay < 300, `delay ${r.delay} outside the test's restartWindow`);
  await back;
  assert.deepEqual(await a.publish("g", 1), { delivered: 1 });
});

test("requests while disconnected reject with not_connected", async () => {
  const c = client(gw, { user: "early" });
  await assert.rejects(c.send("x", 1), (e) => e.code === "not_connected");
  await c.connect();
  assert.deepEqual(await c.send("early", 1), { delivered: 1 });
});
