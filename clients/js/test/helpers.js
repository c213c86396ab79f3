// Test helpers: the real gateway as a child process, waiting with deadlines, HS256 JWTs.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { WsgateClient } from "../wsgate.js";

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, "../../..");

/** The gateway binary: $WSGATE_BIN, else the debug build in the repo's target dir. */
export function gatewayBin() {
  if (process.env.WSGATE_BIN) return process.env.WSGATE_BIN;
  const target = process.env.CARGO_TARGET_DIR || path.join(repoRoot, "target");
  return path.join(target, "debug", "wsgate");
}

/** Polls `cond` until it returns a truthy value; throws after `timeout` ms. */
export async function waitFor(cond, { timeout = 10000, interval = 20, what = "condition" } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

/** Resolves with the detail of the next `type` event of `target` matching `filter`. */
export function nextEvent(target, type, { timeout = 10000, filter = () => true } = {}) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      target.removeEventListener(type, l);
      reject(new Error(`timed out after ${timeout} ms waiting for event ${type}`));
    }, timeout);
    const l = (ev) => {
      if (!filter(ev.detail)) return;
      clearTimeout(timer);
      target.removeEventListener(type, l);
      resolve(ev.detail);
    };
    target.addEventListener(type, l);
  });
}

/** Collects every `message` event of a client into an array. */
export function inbox(client) {
  const got = [];
  client.on("message", (m) => got.push(m));
  return got;
}

export function b64url(buf) {
  return Buffer.from(buf).toString("base64url");
}

/** An HS256 JWT. */
export function mintJwt(secret, claims) {
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const body = b64url(JSON.stringify(claims));
  const sig = createHmac("sha256", secret).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

// Gateways still running when the test process ends (a failed test, a timeout) are killed.
const live = new Set();
process.on("exit", () => {
  for (const p of live) p.kill("SIGKILL");
});
for (const sig of ["SIGINT", "SIGTERM"]) {
  process.once(sig, () => {
    for (const p of live) p.kill("SIGKILL");
    process.exit(130);
  });
}

/** A running gateway. `start()` on port 0 the first time; `restart()` reuses the port. */
export class Gateway {
  constructor(args = []) {
    this.args = args;
    this.proc = null;
    this.addr = null;
    this.stderr = "";
  }

  async start(listen = "127.0.0.1:0", { timeout = 15000 } = {}) {
    const deadline = Date.now() + timeout;
    for (;;) {
      try {
        await this._spawn(listen, deadline);
        return this;
      } catch (e) {
        // Restarting on a fixed port right after a kill may race the old socket: retry.
        if (Date.now() > deadline || listen.endsWith(":0")) throw e;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  _spawn(listen, deadline) {
    return new Promise((resolve, reject) => {
      const proc = spawn(gatewayBin(), ["--listen", listen, "--workers", "2", ...this.args], {
        stdio: ["ignore", "pipe", "pipe"],
      });
      live.add(proc);
      proc.once("exit", () => live.delete(proc));
      let out = "";
      let done = false;
      const timer = setTimeout(() => finish(new Error(`gateway did not print its address in time; stderr: ${this.stderr}`)), Math.max(1, deadline - Date.now()));
      const finish = (err) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (err) {
          proc.kill("SIGKILL");
          reject(err);
        } else resolve();
      };
      proc.on("error", finish);
      proc.stderr.on("data", (d) => {
        this.stderr = (this.stderr + d).slice(-8000);
      });
      proc.stdout.on("data", (d) => {
        out += d;
        const m = out.match(/listening on (\S+)/);
        if (m) {
          this.proc = proc;
          this.addr = m[1];
          this.port = Number(m[1].split(":").pop());
          finish();
        }
      });
      proc.on("exit", (code, sig) => finish(new Error(`gateway exited (${code ?? sig}) before listening; stderr: ${this.stderr}`)));
    });
  }

  get wsUrl() {
    return `ws://${this.addr}/ws`;
  }

  get httpUrl() {
    return `http://${this.addr}`;
  }

  /** Stops the gateway (SIGKILL by default: a crash; "SIGTERM": a graceful 1001 shutdown). */
  async stop(signal = "SIGKILL", { timeout = 15000 } = {}) {
    const proc = this.proc;
    if (!proc) return;
    this.proc = null;
    if (proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise((r) => proc.once("exit", r));
    proc.kill(signal);
    const t = setTimeout(() => proc.kill("SIGKILL"), timeout);
    await exited;
    clearTimeout(t);
  }

  async restart(signal = "SIGKILL") {
    const addr = this.addr;
    await this.stop(signal);
    await this.start(addr);
  }

  async api(method, p, body, headers = {}) {
    const res = await fetch(this.httpUrl + p, {
      method,
      headers: { "content-type": "application/json", ...headers },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return { status: res.status, body: await res.json().catch(() => null) };
  }

  async presence(user) {
    return (await this.api("GET", `/api/presence/${user}`)).body.connections;
  }
}

/** A client with test-friendly timings; closed by `closeAll()`. */
const made = new Set();
export function client(gw, opts = {}) {
  const c = new WsgateClient({
    url: gw.wsUrl,
    backoff: { initial: 100, max: 500, factor: 2, restartWindow: 300, slowDelay: 300 },
    requestTimeout: 5000,
    connectTimeout: 5000,
    ...opts,
  });
  made.add(c);
  return c;
}

export function closeAll() {
  for (const c of made) c.close();
  made.clear();
}
