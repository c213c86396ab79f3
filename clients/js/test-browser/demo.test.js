// The demo page as served by the gateway's --demo (GET /demo/ and /demo/wsgate.js), in two
// browser contexts: two users chatting directly and in a room, presence, live stats, the 401
// note with --api-key, and a screenshot to test-results/demo.png
// (WSGATE_SCREENSHOT=path to write it elsewhere, e.g. the README's clients/js/demo/screenshot.png).
//
// The page is compiled into the binary: when the binary serves an older copy than the files
// on disk, the test fails and says to rebuild (or set WSGATE_DEMO_FROM_DISK=1 while editing
// the page, which serves /demo/ and /demo/wsgate.js from disk, the rest from the gateway).
import test, { before, after } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs/promises";
import path from "node:path";
import { Gateway } from "../test/helpers.js";
import { launch, watchErrors, clientDir } from "./browser.js";

const FROM_DISK = process.env.WSGATE_DEMO_FROM_DISK === "1";
const files = { "/demo/": "demo/index.html", "/demo/wsgate.js": "wsgate.js" };
let gw, browser;
const errors = [];

async function newUserPage(base) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 760 } });
  if (FROM_DISK) {
    for (const [p, f] of Object.entries(files)) {
      const type = f.endsWith(".js") ? "text/javascript" : "text/html";
      await ctx.route(base + p, async (route) =>
        route.fulfill({ status: 200, contentType: type, body: await fs.readFile(path.join(clientDir, f), "utf8") }),
      );
    }
  }
  const page = await ctx.newPage();
  errors.push(watchErrors(page));
  await page.goto(base + "/demo/");
  return page;
}

async function login(page, user) {
  await page.fill("#user", user);
  await page.click("#connect");
  await page.locator("#status").filter({ hasText: /^connected$/ }).waitFor({ timeout: 10000 });
  await page.locator("#me").filter({ hasText: user }).waitFor();
}

async function sendTo(page, kind, target, text) {
  await page.selectOption("#to-kind", kind);
  await page.fill("#target", target);
  await page.fill("#text", text);
  await page.click("#send");
  const li = page.locator("#log li.out", { hasText: text });
  await li.and(page.locator("[data-delivered]")).waitFor({ timeout: 5000 });
  return Number(await li.getAttribute("data-delivered"));
}

async function join(page, room) {
  await page.fill("#room-name", room);
  await page.click("#join");
  await page.locator(`#rooms li[data-room="${room}"]`).waitFor({ timeout: 5000 });
}

before(async () => {
  gw = await new Gateway(["--demo"]).start();
  // A page fulfilled by the test (from disk) has no local address to Chromium, whose Local
  // Network Access checks then block its WebSocket to 127.0.0.1: lift them in that mode only.
  browser = await launch(FROM_DISK ? ["--disable-features=LocalNetworkAccessChecks,LocalNetworkAccessChecksWebSockets"] : []);
});
after(async () => {
  await browser?.close();
  await gw?.stop("SIGTERM");
});

test("the gateway serves the current demo page and client (else: rebuild the binary)", async (t) => {
  const redirect = await fetch(gw.httpUrl + "/demo", { redirect: "manual" });
  assert.equal(redirect.status, 301);
  assert.equal(redirect.headers.get("location"), "/demo/");
  for (const [p, f] of Object.entries(files)) {
    const res = await fetch(gw.httpUrl + p);
    assert.equal(res.status, 200, `${p} (is the binary started with --demo?)`);
    assert.match(res.headers.get("content-type"), f.endsWith(".js") ? /javascript/ : /text\/html/);
    const served = await res.text();
    const disk = await fs.readFile(path.join(clientDir, f), "utf8");
    if (served !== disk) {
      const msg = `the gateway's ${p} differs from clients/js/${f}: rebuild the binary (cargo build --bin wsgate)`;
      if (FROM_DISK) t.diagnostic(`${msg}; WSGATE_DEMO_FROM_DISK=1 serves the files from disk`);
      else assert.fail(msg);
    }
  }
});

test("two users chat through the demo page: direct messages, a room, presence, stats", async () => {
  const alice = await newUserPage(gw.httpUrl);
  const bob = await newUserPage(gw.httpUrl);
  await login(alice, "alice");
  await login(bob, "bob");

  // Direct, both ways.
  assert.equal(await sendTo(alice, "user", "bob", "Hi Bob, are you there?"), 1);
  await bob.locator("#log li.in", { hasText: "Hi Bob, are you there?" }).waitFor({ timeout: 5000 });
  assert.equal(await bob.locator("#log li.in .meta").last().textContent(), "alice → you");
  assert.equal(await sendTo(bob, "user", "alice", "Yes! Hello Alice."), 1);
  await alice.locator("#log li.in", { hasText: "Yes! Hello Alice." }).waitFor({ timeout: 5000 });
  assert.equal(await sendTo(alice, "user", "carol", "Carol?"), 0);
  await alice.locator("#send-result", { hasText: "carol is offline." }).waitFor();

  // A room: both join, each publishes; each message reaches both members.
  await join(alice, "lobby");
  await join(bob, "lobby");
  assert.equal(await sendTo(alice, "room", "lobby", "Welcome to the lobby"), 2);
  assert.equal(await sendTo(bob, "room", "lobby", "Thanks, nice room"), 2);
  await bob.locator("#log li.in.room", { hasText: "Welcome to the lobby" }).waitFor({ timeout: 5000 });
  await alice.locator("#log li.in.room", { hasText: "Thanks, nice room" }).waitFor({ timeout: 5000 });
  assert.equal(await bob.locator("#log li.in.room .meta").first().textContent(), "#lobby · alice");

  // Presence and stats.
  await alice.fill("#presence-user", "bob");
  await alice.click("#presence-check");
  await alice.locator("#presence-result", { hasText: "bob is online (1 connection)" }).waitFor({ timeout: 5000 });
  await alice.locator('[data-stat="connections"]', { hasText: /^2$/ }).waitFor({ timeout: 5000 });
  await alice.locator('[data-stat="users"]', { hasText: /^2$/ }).waitFor({ timeout: 5000 });
  await alice.locator('[data-stat="rooms"]', { hasText: /^1$/ }).waitFor({ timeout: 5000 });

  // What each page shows, in order.
  const shown = (page) => page.locator("#log li:not(.system)").evaluateAll((lis) => lis.map((li) => li.className + " | " + li.lastChild.textContent));
  assert.deepEqual(await shown(alice), [
    "out | Hi Bob, are you there?",
    "in | Yes! Hello Alice.",
    "out | Carol?",
    "out room | Welcome to the lobby", // its echo (alice is a member) is not shown twice
    "in room | Thanks, nice room",
  ]);
  assert.deepEqual(await shown(bob), [
    "in | Hi Bob, are you there?",
    "out | Yes! Hello Alice.",
    "in room | Welcome to the lobby",
    "out room | Thanks, nice room",
  ]);
  for (const page of [alice, bob]) {
    await page.locator("#log li.out.room[data-echoed]").first().waitFor();
  }

  // Bob leaves the room: Alice's next publish reaches only herself.
  await bob.click('#rooms li[data-room="lobby"] button');
  await bob.locator("#no-rooms").waitFor({ state: "visible" });
  assert.equal(await sendTo(alice, "room", "lobby", "Anyone still here?"), 1);

  await alice.fill("#text", "");
  await alice.locator('[data-stat="rate"]').filter({ hasText: /\d/ }).waitFor({ timeout: 5000 });
  // Into test-results/ (ignored by git); WSGATE_SCREENSHOT=path refreshes the README's copy
  // (clients/js/demo/screenshot.png).
  const shot = process.env.WSGATE_SCREENSHOT || path.join(clientDir, "test-results", "demo.png");
  await alice.screenshot({ path: shot });
  for (const e of errors) assert.deepEqual(e, []);
});

test("restart: the demo page reconnects and is back in its room", async () => {
  const carol = await newUserPage(gw.httpUrl);
  await login(carol, "carol");
  await join(carol, "news");
  await gw.restart("SIGKILL");
  await carol.locator("#log li.system", { hasText: "reconnected, back in #news" }).waitFor({ timeout: 20000 });
  const pub = await gw.api("POST", "/api/publish", { room: "news", data: { text: "after the restart" } });
  assert.deepEqual(pub.body, { delivered: 1 });
  await carol.locator("#log li.in.room", { hasText: "after the restart" }).waitFor({ timeout: 5000 });
  assert.equal(await carol.locator("#log li.in.room .meta").last().textContent(), "#news · backend");
});

test("with --api-key the page says an API key is needed, and uses one when given", async () => {
  const keyed = await new Gateway(["--demo", "--api-key", "k3y"]).start();
  try {
    const page = await newUserPage(keyed.httpUrl);
    await page.locator("#stats-note", { hasText: "an API key is needed" }).waitFor({ timeout: 5000 });
    await page.fill("#api-key", "k3y");
    await page.click("#key-form button");
    await page.locator("#stats-note").waitFor({ state: "hidden", timeout: 5000 });
    await page.locator('[data-stat="cores"]', { hasText: /^2$/ }).waitFor({ timeout: 5000 });
  } finally {
    await keyed.stop("SIGTERM");
  }
});
