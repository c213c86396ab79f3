// Token refresh against the real gateway in JWT mode (--jwt-secret, --jwt-leeway 0s).
import test, { before, after, afterEach } from "node:test";
import assert from "node:assert/strict";
import { Gateway, client, closeAll, waitFor, nextEvent, inbox, mintJwt } from "./helpers.js";

const SECRET = "test-secret-for-the-js-client";
let gw;
before(async () => {
  gw = await new Gateway(["--jwt-secret", SECRET, "--jwt-leeway", "0s"]).start();
});
afterEach(() => closeAll());
after(async () => {
  closeAll();
  await gw.stop("SIGTERM");
});

const now = () => Math.floor(Date.now() / 1000);

test("1008 token expired: getToken() gives a fresh token, the client reconnects and re-joins", async () => {
  const issued = [];
  const getToken = async () => {
    const t = mintJwt(SECRET, { sub: "jwt-user", exp: now() + 2 });
    issued.push(t);
    return t;
  };
  const c = client(gw, { getToken });
  const w = await c.connect();
  assert.equal(w.user, "jwt-user");
  await c.join("jwt-room");
  const other = client(gw, { token: mintJwt(SECRET, { sub: "jwt-other" }) }); // no exp
  await other.connect();
  const got = inbox(c);

  const closed = nextEvent(c, "close", { timeout: 10000 });
  const back = nextEvent(c, "welcome", { filter: (x) => x.reconnected, timeout: 10000 });
  const ev = await closed;
  assert.equal(ev.code, 1008);
  assert.equal(ev.reason, "token expired");
  assert.equal(ev.willReconnect, true);
  const again = await back;
  assert.ok(issued.length >= 2, "getToken was called again");
  assert.notEqual(issued[issued.length - 1], issued[0]);
  assert.deepEqual(again.rooms, ["jwt-room"]);
  assert.deepEqual(await other.publish("jwt-room", "still here"), { delivered: 1 });
  assert.deepEqual(await other.send("jwt-user", "dm"), { delivered: 1 });
  await waitFor(() => got.length === 2, { what: "two messages" });
});

test("a refused token (401 at the upgrade) makes the client fetch a new one", async () => {
  let n = 0;
  const getToken = async () => (++n === 1 ? mintJwt("wrong-secret", { sub: "late" }) : mintJwt(SECRET, { sub: "late" }));
  const c = client(gw, { getToken });
  const w = await c.connect();
  assert.equal(w.user, "late");
  assert.equal(n, 2);
});

test("without getToken, an expired token stops the client (no reconnect loop)", async () => {
  const c = client(gw, { token: mintJwt(SECRET, { sub: "static", exp: now() + 2 }) });
  await c.connect();
  const err = nextEvent(c, "error", { timeout: 10000 });
  const closed = await nextEvent(c, "close", { timeout: 10000 });
  assert.equal(closed.code, 1008);
  assert.equal(closed.willReconnect, false);
  assert.equal((await err).error.code, "token_expired");
  assert.equal(c.state, "closed");
});
