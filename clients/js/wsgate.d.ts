// Types for wsgate.js (wsgate protocol v1).

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

export interface Backoff {
  /** Window of the first retry in ms: delay = random(0, initial). Default 1000. */
  initial?: number;
  /** The window never grows past this, in ms. Default 30000. */
  max?: number;
  /** Window growth per failed attempt. Default 2. */
  factor?: number;
  /** After 1001 (server shutting down) the window is at least this, in ms. Default 5000. */
  restartWindow?: number;
  /** After 1013 (slow consumer / overloaded): wait at least this, plus up to as much again. Default 5000. */
  slowDelay?: number;
}

export const DEFAULT_BACKOFF: Readonly<Required<Backoff>>;
export const CLIENT_ERROR_CODES: readonly string[];

/** Constructor compatible with the WHATWG WebSocket (browsers, Node >= 22). */
export type WebSocketConstructor = new (url: string) => {
  readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string; wasClean: boolean }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
};

export interface WsgateClientOptions {
  /** The gateway's WebSocket endpoint, e.g. "ws://127.0.0.1:8080/ws" (http(s) is turned into ws(s); in a browser a path like "/ws" is resolved against the page). */
  url: string;
  /** Development mode only (no JWT secret on the gateway): sent as ?user=. */
  user?: string;
  /** A JWT (HS256, sub = user id), sent as ?token=. */
  token?: string;
  /** Returns a fresh JWT. Called before the first connection when no token is given, after a close with 1008 "token expired", when the token's exp has passed, and after an attempt that failed before its welcome (a refused token looks like 1006 to a browser). */
  getToken?: () => Promise<string> | string;
  backoff?: Backoff;
  /** ms to wait for a request's ack or error. Default 10000. */
  requestTimeout?: number;
  /** ms from opening the socket to the welcome; past it the attempt counts as failed. Default 10000. */
  connectTimeout?: number;
  /** Reconnect after 1008 closes other than "token expired" (kicked, rate-limit abuse), with the 1013 delay. Default false. */
  reconnectOnPolicyClose?: boolean;
  /** Reconnect at all. Default true. */
  reconnect?: boolean;
  /** Requests made while disconnected wait in a queue of at most this many and go out (in order) once reconnected; 0 (default) rejects them at once with code "not_connected". */
  queueLimit?: number;
  /** Random numbers in [0, 1) for the jitter (tests). Default Math.random. */
  random?: () => number;
  /** A WebSocket constructor when there is no global one (Node 20 without --experimental-websocket: pass the `ws` package's). */
  WebSocket?: WebSocketConstructor;
}

export interface Delivery {
  /** The sender's user id; absent when the backend API sent the message. */
  from?: string;
  /** The room, for room messages only. */
  room?: string;
  data: Json;
}

export interface WelcomeDetail {
  user: string;
  conn: string;
  /** False on the first connection, true after a reconnect. */
  reconnected: boolean;
  /** The rooms this connection is in (all re-joined before this event). */
  rooms: string[];
}

export interface CloseDetail {
  code: number;
  reason: string;
  wasClean: boolean;
  willReconnect: boolean;
}

export interface ReconnectingDetail {
  /** 1 for the first retry since the last welcome. */
  attempt: number;
  /** ms until the attempt. */
  delay: number;
  /** The close code that led to it. */
  code: number;
}

export interface ErrorDetail {
  error: WsgateError | Error;
  /** Set when a room could not be re-joined (it is dropped). */
  room?: string;
}

export interface WsgateEventMap {
  open: { attempt: number };
  welcome: WelcomeDetail;
  message: Delivery;
  close: CloseDetail;
  reconnecting: ReconnectingDetail;
  error: ErrorDetail;
}

export type State = "idle" | "connecting" | "joining" | "open" | "waiting" | "closed";

export class WsgateError extends Error {
  constructor(code: string, message?: string, request?: object);
  /** The server's code (bad_json, bad_request, bad_user, bad_room, too_many_rooms, rate_limited) or the client's (timeout, not_connected, connection_closed, client_closed, token_expired, policy_close, token_error, bad_frame). */
  code: string;
  /** The request that failed, when there is one. */
  request?: object;
}

export class WsgateClient extends EventTarget {
  constructor(options: WsgateClientOptions);
  readonly state: State;
  /** True when requests go out at once. */
  readonly connected: boolean;
  /** The rooms this client is in and re-joins after a reconnect. */
  readonly rooms: string[];
  /** The user id and connection id of the current (or last) connection. */
  user: string | undefined;
  conn: string | undefined;

  /** Starts (or, after the server stopped it with a policy close, restarts) connecting; resolves at the next welcome. */
  connect(): Promise<{ user: string; conn: string }>;
  /** Stops for good: closes the connection, rejects pending requests ("client_closed"), never reconnects. */
  close(code?: number, reason?: string): void;

  send(to: string, data: Json): Promise<{ delivered: number }>;
  publish(room: string, data: Json): Promise<{ delivered: number }>;
  join(room: string): Promise<Record<string, never>>;
  leave(room: string): Promise<Record<string, never>>;

  /** Adds a listener called with the event's detail; returns a function that removes it. */
  on<K extends keyof WsgateEventMap>(type: K, fn: (detail: WsgateEventMap[K], event: Event) => void): () => void;
  off<K extends keyof WsgateEventMap>(type: K, fn: (detail: WsgateEventMap[K], event: Event) => void): void;
}

/** Full-jitter delay: floor + random() * max(minWindow, min(max, initial * factor ** attempt)). */
export function reconnectDelay(
  attempt: number,
  backoff?: Backoff,
  random?: () => number,
  extra?: { floor?: number; minWindow?: number },
): number;

export interface ClosePolicy {
  reconnect: boolean;
  refreshToken: boolean;
  floor: number;
  minWindow: number;
  error?: "token_expired" | "policy_close";
}

/** What the client does after a close with this code and reason. */
export function closePolicy(
  code: number,
  reason?: string,
  opts?: { backoff?: Backoff; canRefreshToken?: boolean; reconnectOnPolicyClose?: boolean },
): ClosePolicy;

/** A JWT's exp in ms since the epoch, or undefined. */
export function jwtExpiry(token: string): number | undefined;

export default WsgateClient;
