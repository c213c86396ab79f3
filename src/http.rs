//! HTTP/1.1 on the gateway's port: request parsing (httparse), the WebSocket upgrade checks
//! of RFC 6455 §4.2.1, and plain answers. I/O-free; the connection module feeds it bytes.

use std::borrow::Cow;

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 48;

/// A parsed request. Small and owned: only handshakes and API calls come through here.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The raw query string (after `?`), if any.
    pub query: Option<String>,
    /// `true` for HTTP/1.1, `false` for HTTP/1.0.
    pub http11: bool,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` bytes).
    pub body: Vec<u8>,
}

/// A request that cannot be served: the status to answer with and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// HTTP status code.
    pub status: u16,
    /// Explanation sent in the body.
    pub message: Cow<'static, str>,
}

impl HttpError {
    /// An error with a status and a message.
    pub fn new(status: u16, message: impl Into<Cow<'static, str>>) -> Self {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

impl Request {
    /// The first header named `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header contains `token` (case-insensitive).
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The first query parameter named `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let q = self.query.as_deref()?;
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }

    /// Whether the connection stays open after the answer.
    pub fn keep_alive(&self) -> bool {
        if self.header_has_token("connection", "close") {
            return false;
        }
        self.http11 || self.header_has_token("connection", "keep-alive")
    }

    /// The bearer token of an `Authorization` header, if any.
    pub fn bearer(&self) -> Option<&str> {
        let v = self.header("authorization")?;
        let (scheme, token) = v.split_once(' ')?;
        scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim())
            .filter(|t| !t.is_empty())
    }
}

/// Parses one request from the front of `buf`.
///
/// `Ok(None)`: more bytes are needed. `Ok(Some((req, used)))`: a whole request, `used` bytes
/// long (pipelined requests may follow). `Err`: answer with the error and close.
pub fn parse_request(buf: &[u8], max_body: usize) -> Result<Option<(Request, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD {
                return Err(HttpError::new(431, "request head too large"));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::new(431, "too many headers"));
        }
        Err(e) => return Err(HttpError::new(400, format!("malformed request: {e}"))),
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::new(431, "request head too large"));
    }
    let method = req.method.unwrap_or("").to_string();
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_string(), Some(q.to_string())),
        None => (target.to_string(), None),
    };
    let http11 = req.version == Some(1);
    let headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let mut request = Request {
        method,
        path,
        query,
        http11,
        headers,
        body: Vec::new(),
    };
    if request.header("transfer-encoding").is_some() {
        return Err(HttpError::new(
            411,
            "chunked bodies are not supported: send Content-Length",
        ));
    }
    let body_len = content_length(&request.headers)?;
    if body_len > max_body {
        return Err(HttpError::new(
            413,
            format!("body over the {max_body}-byte limit"),
        ));
    }
    if buf.len() < head_len + body_len {
        return Ok(None);
    }
    request.body = buf[head_len..head_len + body_len].to_vec();
    Ok(Some((request, head_len + body_len)))
}

/// The body length a request declares (0 without `Content-Length`). RFC 9112 §6.3: a value
/// that is not a plain decimal number (`+12`, `1_0`, `0x10`), or several different values,
/// is an error that closes the connection: a proxy in front could read the body differently
/// (request smuggling). Repeats of one value are accepted.
fn content_length(headers: &[(String, String)]) -> Result<usize, HttpError> {
    let mut found: Option<usize> = None;
    for (_, v) in headers.iter().filter(|(n, _)| n == "content-length") {
        for part in v.split(',') {
            let part = part.trim();
            if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::new(400, "invalid Content-Length"));
            }
            let n: usize = part
                .parse()
                .map_err(|_| HttpError::new(400, "invalid Content-Length"))?;
            if found.is_some_and(|f| f != n) {
                return Err(HttpError::new(400, "conflicting Content-Length values"));
            }
            found = Some(n);
        }
    }
    Ok(found.unwrap_or(0))
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Whether `buf` starts with a complete request head that asks `Expect: 100-continue` and
/// whose body has not fully arrived: the client waits for `100 Continue` before sending it
/// (curl waits a second, then sends anyway).
pub fn wants_continue(buf: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head)) = req.parse(buf) else {
        return false;
    };
    if req.version != Some(1) {
        return false;
    }
    let expects = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("expect")
            && std::str::from_utf8(h.value)
                .is_ok_and(|v| v.trim().eq_ignore_ascii_case("100-continue"))
    });
    expects && buf.len() == head
}

/// The length of an answer's head (through the blank line): what a `HEAD` request gets.
pub fn head_len(answer: &[u8]) -> usize {
    answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(answer.len(), |p| p + 4)
}

/// Checks a WebSocket upgrade request (RFC 6455 §4.2.1) and returns the
/// `Sec-WebSocket-Accept` value for it.
pub fn check_upgrade(req: &Request) -> Result<String, HttpError> {
    if req.method != "GET" {
        return Err(HttpError::new(400, "a WebSocket upgrade must be a GET"));
    }
    if !req.http11 {
        return Err(HttpError::new(400, "a WebSocket upgrade needs HTTP/1.1"));
    }
    if !req.header_has_token("upgrade", "websocket") {
        return Err(HttpError::new(
            400,
            "expected a WebSocket upgrade (Upgrade: websocket)",
        ));
    }
    if !req.header_has_token("connection", "upgrade") {
        return Err(HttpError::new(
            400,
            "expected a WebSocket upgrade (Connection: Upgrade)",
        ));
    }
    if req.header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(HttpError::new(
            400,
            "unsupported Sec-WebSocket-Version: use 13",
        ));
    }
    let key = req
        .header("sec-websocket-key")
        .map(str::trim)
        .ok_or_else(|| HttpError::new(400, "missing Sec-WebSocket-Key"))?;
    if !valid_ws_key(key) {
        return Err(HttpError::new(400, "invalid Sec-WebSocket-Key"));
    }
    Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// A key is the base64 of 16 bytes: 22 characters and `==`.
fn valid_ws_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b.ends_with(b"==")
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// The `101 Switching Protocols` answer.
pub fn switching_protocols(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A complete answer with a body.
pub fn response(
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    extra_headers: &str,
) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}{extra_headers}\r\n",
        reason(status),
        body.len(),
        if keep_alive { "" } else { "Connection: close\r\n" },
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

/// A JSON error answer: `{"error": code, "message": text}`.
pub fn json_error(status: u16, code: &str, message: &str, keep_alive: bool) -> Vec<u8> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    response(status, "application/json", body.as_bytes(), keep_alive, "")
}

/// The answer for an [`HttpError`]: a JSON error body, and the connection closes.
pub fn error_response(e: &HttpError) -> Vec<u8> {
    let code = match e.status {
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        429 => "too_many_connections",
        503 => "unavailable",
        _ => "bad_request",
    };
    let extra = if e.status == 400 && e.message.contains("Sec-WebSocket-Version") {
        "Sec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    let body = serde_json::json!({ "error": code, "message": e.message }).to_string();
    response(e.status, "application/json", body.as_bytes(), false, extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &str = "GET /ws?user=u%401 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn parses_an_upgrade_and_derives_the_rfc_accept_key() {
        let (req, used) = parse_request(UPGRADE.as_bytes(), 0).unwrap().unwrap();
        assert_eq!(used, UPGRADE.len());
        assert_eq!(req.path, "/ws");
        assert_eq!(req.query_param("user").as_deref(), Some("u@1"));
        // The example from RFC 6455 §1.3.
        assert_eq!(check_upgrade(&req).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn partial_heads_and_bodies_ask_for_more() {
        assert!(parse_request(&UPGRADE.as_bytes()[..20], 0)
            .unwrap()
            .is_none());
        let post = b"POST /api/send HTTP/1.1\r\nContent-Length: 5\r\n\r\nab";
        assert!(parse_request(post, 100).unwrap().is_none());
    }

    #[test]
    fn pipelined_requests_are_split() {
        let two = b"GET /healthz HTTP/1.1\r\n\r\nPOST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi";
        let (a, used) = parse_request(two, 10).unwrap().unwrap();
        assert_eq!(a.path, "/healthz");
        let (b, used2) = parse_request(&two[used..], 10).unwrap().unwrap();
        assert_eq!(b.body, b"hi");
        assert_eq!(used + used2, two.len());
    }

    #[test]
    fn bad_requests_get_clear_statuses() {
        assert_eq!(
            parse_request(b"\x01\x02 nonsense\r\n\r\n", 0)
                .unwrap_err()
                .status,
            400
        );
        let big = b"POST /x HTTP/1.1\r\nContent-Length: 11\r\n\r\n";
        assert_eq!(parse_request(big, 10).unwrap_err().status, 413);
        let long = vec![b'a'; MAX_HEAD + 10];
        assert_eq!(parse_request(&long, 0).unwrap_err().status, 431);
        let no_upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n";
        let (req, _) = parse_request(no_upgrade, 0).unwrap().unwrap();
        assert_eq!(check_upgrade(&req).unwrap_err().status, 400);
        let bad_key = UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "short");
        let (req, _) = parse_request(bad_key.as_bytes(), 0).unwrap().unwrap();
        assert_eq!(check_upgrade(&req).unwrap_err().status, 400);
    }

    #[test]
    fn content_length_is_strict() {
        let req = |cl: &str| format!("POST /x HTTP/1.1\r\n{cl}\r\n\r\nhello");
        for bad in [
            "Content-Length: +5",
            "Content-Length: -5",
            "Content-Length: 0x5",
            "Content-Length: 5 5",
            "Content-Length: 5\r\nContent-Length: 6",
            "Content-Length: 5, 6",
            "Content-Length: ",
            "Content-Length: 99999999999999999999999999",
        ] {
            let e = parse_request(req(bad).as_bytes(), 100).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
        }
        for good in [
            "Content-Length: 5",
            "Content-Length:  5 ",
            "Content-Length: 5\r\nContent-Length: 5",
            "Content-Length: 5, 5",
        ] {
            let (r, _) = parse_request(req(good).as_bytes(), 100).unwrap().unwrap();
            assert_eq!(r.body, b"hello", "{good}");
        }
    }

    #[test]
    fn expect_continue_and_head() {
        let head = b"POST /api/send HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
        assert!(wants_continue(head));
        let mut full = head.to_vec();
        full.extend_from_slice(b"hello");
        assert!(!wants_continue(&full), "the body is already here");
        assert!(!wants_continue(&head[..20]), "head incomplete");
        assert!(!wants_continue(
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\n"
        ));
        let answer = response(200, "text/plain", b"ok", true, "");
        assert_eq!(&answer[head_len(&answer)..], b"ok");
    }

    #[test]
    fn bearer_and_keep_alive() {
        let r = b"GET / HTTP/1.0\r\nAuthorization: Bearer abc\r\n\r\n";
        let (req, _) = parse_request(r, 0).unwrap().unwrap();
        assert_eq!(req.bearer(), Some("abc"));
        assert!(!req.keep_alive());
        let r = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
        let (req, _) = parse_request(r, 0).unwrap().unwrap();
        assert!(!req.keep_alive());
    }
}
