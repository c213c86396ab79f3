// The JavaScript client in headless Chromium against the real gateway: two users, direct and
// room messages, then the gateway is killed and restarted on the same port and the page's
// clients must come back by themselves, in their rooms.
import test, { before, after } from "node:test";
import assert from "node:assert/strict";
import { Gateway } from "../test/helpers.js";
import { launch, staticServer, watchErrors } from "./browser.js";

let gw, site, browser, page, errors;
before(async () => {
  gw = await new Gateway().start();
  site = await staticServer({ "/": "test-browser/page.html", "/wsgate.js": "wsgate.js" });
  browser = await launch();
  page = await browser.newPage();
  errors = watchErrors(page);
  await page.goto(site.url + "/");
  await page.waitForFunction(() => window.ready === true, null, { timeout: 10000 });
});
after(async () => {
  await browser?.close();
  await site?.close();
  await gw?.stop("SIGTERM");
});

test("two users in the browser: direct and room messages with exact delivered counts", async () => {
  const r = await page.evaluate(async (url) => {
    const { WsgateClient } = window.wsgate;
    const backoff = { initial: 200, max: 1000, factor: 2, restartWindow: 500, slowDelay: 500 };
    const mk = (user) => {
      const c = new WsgateClient({ url, user, backoff, requestTimeout: 5000 });
      c.inbox = [];
      c.welcomes = [];
      c.closes = [];
      c.on("message", (m) => c.inbox.push(m));
      c.on("welcome", (w) => c.welcomes.push(w));
      c.on("close", (x) => c.closes.push(x));
      return c;
    };
    const alice = mk("alice");
    const bob = mk("bob");
    window.clients = { alice, bob };
    await Promise.all([alice.connect(), bob.connect()]);
    const direct = await alice.send("bob", { text: "hi bob", big: 12345678901234 });
    await bob.join("lobby");
    await alice.join("lobby");
    const room = await alice.publish("lobby", "hello room");
    const offline = await alice.send("carol", 1);
    const deadline = Date.now() + 5000;
    while (bob.inbox.length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    let badUser = null;
    try {
      await alice.send("not valid!", 1);
    } catch (e) {
      badUser = e.code;
    }
    return { direct, room, offline, inbox: bob.inbox, badUser, ua: navigator.userAgent };
  }, gw.wsUrl);
  assert.match(r.ua, /Chrome/);
  assert.deepEqual(r.direct, { delivered: 1 });
  assert.deepEqual(r.room, { delivered: 2 });
  assert.deepEqual(r.offline, { delivered: 0 });
  assert.equal(r.badUser, "bad_user");
  assert.deepEqual(r.inbox, [
    { from: "alice", data: { text: "hi bob", big: 12345678901234 } },
    { from: "alice", room: "lobby", data: "hello room" },
  ]);
  assert.equal(await gw.presence("alice"), 1);
  assert.equal(await gw.presence("bob"), 1);
});

test("gateway killed and restarted on the same port: the page's clients reconnect and are back in their room", async () => {
  const port = gw.port;
  await gw.restart("SIGKILL");
  assert.equal(gw.port, port);
  await page.waitForFunction(
    () => Object.values(window.clients).every((c) => c.welcomes.some((w) => w.reconnected) && c.state === "open"),
    null,
    { timeout: 15000, polling: 50 },
  );
  const state = await page.evaluate(() => ({
    closes: window.clients.bob.closes,
    rooms: window.clients.bob.welcomes.at(-1).rooms,
  }));
  assert.equal(state.closes[0].code, 1006);
  assert.equal(state.closes[0].willReconnect, true);
  assert.deepEqual(state.rooms, ["lobby"]);
  // A backend publish reaches both re-joined members, exactly.
  const pub = await gw.api("POST", "/api/publish", { room: "lobby", data: { after: "restart" } });
  assert.deepEqual(pub.body, { delivered: 2 });
  await page.waitForFunction(() => window.clients.bob.inbox.some((m) => m.data && m.data.after === "restart"), null, { timeout: 5000 });
  const last = await page.evaluate(() => window.clients.bob.inbox.at(-1));
  assert.deepEqual(last, { room: "lobby", data: { after: "restart" } }); // from the backend: no from
  // And from the page itself.
  const again = await page.evaluate(() => window.clients.bob.publish("lobby", "bob is back"));
  assert.deepEqual(again, { delivered: 2 });
  assert.deepEqual(errors, []);
});

test("close() in the browser: the user goes offline and stays offline", async () => {
  await page.evaluate(() => window.clients.alice.close());
  const deadline = Date.now() + 5000;
  while ((await gw.presence("alice")) !== 0) {
    assert.ok(Date.now() < deadline, "alice still online after close()");
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.equal(await page.evaluate(() => window.clients.alice.state), "closed");
  assert.deepEqual(await gw.api("POST", "/api/send", { to: "bob", data: "x" }).then((r) => r.body), { delivered: 1 });
});
