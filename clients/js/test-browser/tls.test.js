// The gateway with --tls-cert/--tls-key in headless Chromium: a self-signed certificate for
// localhost and 127.0.0.1 (made with the openssl CLI), the demo page and its client loaded over
// https://, two clients over wss:// and /api/stats over HTTPS, all from the page.
import test, { before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { Gateway } from "../test/helpers.js";
import { launch, watchErrors } from "./browser.js";

/** A self-signed EC P-256 certificate for localhost and 127.0.0.1 in `dir`: {cert, key}. */
function selfSigned(dir) {
  const cert = path.join(dir, "cert.pem");
  const key = path.join(dir, "key.pem");
  try {
    execFileSync("openssl", [
      "req", "-x509", "-nodes", "-days", "2", "-subj", "/CN=localhost",
      "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
      "-keyout", key, "-out", cert,
      "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
      "-addext", "basicConstraints=critical,CA:FALSE",
    ], { stdio: ["ignore", "ignore", "pipe"], timeout: 20000 });
  } catch (e) {
    if (e.code === "ENOENT") throw new Error("the openssl CLI is required for the TLS test (apt-get install openssl)");
    throw new Error(`openssl failed: ${e.stderr || e.message}`);
  }
  return { cert, key };
}

let dir, gw, browser;
before(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), "wsgate-tls-"));
  const { cert, key } = selfSigned(dir);
  gw = await new Gateway(["--demo", "--tls-cert", cert, "--tls-key", key]).start();
  browser = await launch();
});
after(async () => {
  await browser?.close();
  await gw?.stop("SIGTERM");
  if (dir) await fs.rm(dir, { recursive: true, force: true });
});

test("over TLS: the demo page over https, two clients over wss, /api/stats over HTTPS", async () => {
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await ctx.newPage();
  const errors = watchErrors(page);
  const base = `https://localhost:${gw.port}`;
  const res = await page.goto(base + "/demo/", { timeout: 10000 });
  assert.equal(res.status(), 200);

  const r = await page.evaluate(async () => {
    const { WsgateClient } = await import("/demo/wsgate.js");
    const url = `wss://${location.host}/ws`;
    const alice = new WsgateClient({ url, user: "tls-alice", requestTimeout: 5000, connectTimeout: 5000 });
    const bob = new WsgateClient({ url, user: "tls-bob", requestTimeout: 5000, connectTimeout: 5000 });
    const inbox = [];
    bob.on("message", (m) => inbox.push(m));
    // connect() retries a failed attempt: bound it (page.evaluate has no timeout of its own).
    const late = new Promise((_, reject) => setTimeout(() => reject(new Error("no welcome over wss within 10 s")), 10000));
    await Promise.race([Promise.all([alice.connect(), bob.connect()]), late]);
    const sent = await alice.send("tls-bob", { text: "over wss", n: 42 });
    const deadline = Date.now() + 5000;
    while (inbox.length < 1 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    const stats = await fetch("/api/stats", { signal: AbortSignal.timeout(5000) });
    const out = {
      protocol: location.protocol,
      secure: window.isSecureContext,
      sent,
      inbox,
      statsStatus: stats.status,
      statsType: stats.headers.get("content-type"),
      stats: await stats.json(),
    };
    alice.close();
    bob.close();
    return out;
  });
  assert.equal(r.protocol, "https:");
  assert.equal(r.secure, true);
  assert.deepEqual(r.sent, { delivered: 1 });
  assert.deepEqual(r.inbox, [{ from: "tls-alice", data: { text: "over wss", n: 42 } }]);
  assert.equal(r.statsStatus, 200);
  assert.match(r.statsType, /application\/json/);
  assert.equal(r.stats.connections, 2);
  assert.deepEqual(errors, []);
  await ctx.close();
});
