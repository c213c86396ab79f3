//! The v1 JSON protocol: parsing client requests and building server messages.
//!
//! I/O-free. `data` and `id` are kept as raw JSON text (`RawValue`) and written back byte for
//! byte, so large integers, long floats and escapes pass through exactly. Server messages are
//! serialized once, straight into a WebSocket frame (see [`crate::codec::text_frame_with`]).

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::codec;

/// Error codes of the protocol's `error` message and of the HTTP API's error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The text is not JSON.
    BadJson,
    /// Unknown type, missing or mistyped field.
    BadRequest,
    /// A user id outside the allowed syntax.
    BadUser,
    /// A room name outside the allowed syntax.
    BadRoom,
    /// The connection is already in `--max-rooms-per-conn` rooms.
    TooManyRooms,
    /// Over the connection's message rate.
    RateLimited,
}

impl ErrorCode {
    /// The code as written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadUser => "bad_user",
            ErrorCode::BadRoom => "bad_room",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::RateLimited => "rate_limited",
        }
    }
}

/// A request that could not be carried out: code and human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtoError {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: Cow<'static, str>,
}

impl ProtoError {
    fn new(code: ErrorCode, message: impl Into<Cow<'static, str>>) -> Self {
        ProtoError {
            code,
            message: message.into(),
        }
    }
}

/// A parsed client request.
#[derive(Debug)]
pub enum Request<'a> {
    /// Deliver `data` to every connection of user `to`.
    Send {
        /// Recipient user id.
        to: Cow<'a, str>,
        /// Raw JSON payload.
        data: &'a RawValue,
    },
    /// Join a room.
    Join {
        /// Room name.
        room: Cow<'a, str>,
    },
    /// Leave a room.
    Leave {
        /// Room name.
        room: Cow<'a, str>,
    },
    /// Deliver `data` to every member of a room.
    Publish {
        /// Room name.
        room: Cow<'a, str>,
        /// Raw JSON payload.
        data: &'a RawValue,
    },
}

/// A client text message after parsing: the `id` to echo (when valid) and the request or the
/// reason it was refused.
#[derive(Debug)]
pub struct Parsed<'a> {
    /// The request's `id`, raw, when it was a JSON string or number.
    pub id: Option<&'a RawValue>,
    /// The request, or why it cannot be carried out.
    pub request: Result<Request<'a>, ProtoError>,
}

/// Every field as raw JSON, so that one mistyped field does not hide the others (the `id`
/// must be echoed even when `to` is wrong).
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    to: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    room: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    user: Option<&'a RawValue>,
}

/// `Option<&RawValue>` that keeps a JSON `null` as `Some("null")`: `data: null` is a value,
/// only a missing field is `None`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// A JSON string's contents, borrowed when it has no escapes.
pub fn raw_str(raw: &RawValue) -> Option<Cow<'_, str>> {
    let s = raw.get();
    if !s.starts_with('"') {
        return None;
    }
    let inner = &s[1..s.len() - 1];
    if !inner.contains('\\') {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(s).ok().map(Cow::Owned)
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
}

/// A user id is 1–64 bytes of `A-Z a-z 0-9 _ - . : @`.
pub fn valid_user(s: &str) -> bool {
    valid_name(s, 64)
}

/// A room name is 1–128 bytes of `A-Z a-z 0-9 _ - . : @`.
pub fn valid_room(s: &str) -> bool {
    valid_name(s, 128)
}

fn field_str<'a>(
    raw: Option<&'a RawValue>,
    name: &'static str,
    code: ErrorCode,
    valid: fn(&str) -> bool,
) -> Result<Cow<'a, str>, ProtoError> {
    let raw = raw
        .ok_or_else(|| ProtoError::new(ErrorCode::BadRequest, format!("missing field `{name}`")))?;
    let s = raw_str(raw).ok_or_else(|| {
        ProtoError::new(ErrorCode::BadRequest, format!("`{name}` must be a string"))
    })?;
    if !valid(&s) {
        return Err(ProtoError::new(
            code,
            format!("`{name}` must be 1-64 (user) or 1-128 (room) bytes of A-Z a-z 0-9 _ - . : @"),
        ));
    }
    Ok(s)
}

fn field_data(raw: Option<&RawValue>) -> Result<&RawValue, ProtoError> {
    raw.ok_or_else(|| ProtoError::new(ErrorCode::BadRequest, "missing field `data`"))
}

/// Parses one client text message.
pub fn parse(text: &str) -> Parsed<'_> {
    let fields: Fields<'_> = match serde_json::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let code = if e.is_data() {
                ErrorCode::BadRequest
            } else {
                ErrorCode::BadJson
            };
            let message = if e.is_data() {
                "a request must be a JSON object".to_string()
            } else {
                format!("invalid JSON: {e}")
            };
            return Parsed {
                id: None,
                request: Err(ProtoError::new(code, message)),
            };
        }
    };
    let id = fields.id.filter(|raw| {
        let s = raw.get();
        s.starts_with('"') || s.starts_with('-') || s.as_bytes()[0].is_ascii_digit()
    });
    let request = if fields.id.is_some() && id.is_none() {
        Err(ProtoError::new(
            ErrorCode::BadRequest,
            "`id` must be a string or a number",
        ))
    } else {
        request(&fields)
    };
    Parsed { id, request }
}

fn request<'a>(f: &Fields<'a>) -> Result<Request<'a>, ProtoError> {
    let kind = f
        .kind
        .ok_or_else(|| ProtoError::new(ErrorCode::BadRequest, "missing field `type`"))?;
    let kind = raw_str(kind)
        .ok_or_else(|| ProtoError::new(ErrorCode::BadRequest, "`type` must be a string"))?;
    match &*kind {
        "send" => Ok(Request::Send {
            to: field_str(f.to, "to", ErrorCode::BadUser, valid_user)?,
            data: field_data(f.data)?,
        }),
        "join" => Ok(Request::Join {
            room: field_str(f.room, "room", ErrorCode::BadRoom, valid_room)?,
        }),
        "leave" => Ok(Request::Leave {
            room: field_str(f.room, "room", ErrorCode::BadRoom, valid_room)?,
        }),
        "publish" => Ok(Request::Publish {
            room: field_str(f.room, "room", ErrorCode::BadRoom, valid_room)?,
            data: field_data(f.data)?,
        }),
        other => Err(ProtoError::new(
            ErrorCode::BadRequest,
            format!(
                "unknown type `{}`",
                other.chars().take(32).collect::<String>()
            ),
        )),
    }
}

/// A backend API call's body, parsed.
#[derive(Debug)]
pub enum ApiRequest<'a> {
    /// `POST /api/send`.
    Send {
        /// Recipient user id.
        to: Cow<'a, str>,
        /// Raw JSON payload.
        data: &'a RawValue,
    },
    /// `POST /api/publish`.
    Publish {
        /// Room name.
        room: Cow<'a, str>,
        /// Raw JSON payload.
        data: &'a RawValue,
    },
    /// `POST /api/broadcast`.
    Broadcast {
        /// Raw JSON payload.
        data: &'a RawValue,
    },
    /// `POST /api/disconnect`.
    Disconnect {
        /// The user whose connections are closed.
        user: Cow<'a, str>,
    },
}

/// Parses the JSON body of the API call named `call` (`send`, `publish`, `broadcast`,
/// `disconnect`).
pub fn parse_api<'a>(call: &str, body: &'a [u8]) -> Result<ApiRequest<'a>, ProtoError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ProtoError::new(ErrorCode::BadJson, "body is not UTF-8"))?;
    let f: Fields<'a> = serde_json::from_str(text).map_err(|e| {
        if e.is_data() {
            ProtoError::new(ErrorCode::BadRequest, "the body must be a JSON object")
        } else {
            ProtoError::new(ErrorCode::BadJson, format!("invalid JSON: {e}"))
        }
    })?;
    match call {
        "send" => Ok(ApiRequest::Send {
            to: field_str(f.to, "to", ErrorCode::BadUser, valid_user)?,
            data: field_data(f.data)?,
        }),
        "publish" => Ok(ApiRequest::Publish {
            room: field_str(f.room, "room", ErrorCode::BadRoom, valid_room)?,
            data: field_data(f.data)?,
        }),
        "broadcast" => Ok(ApiRequest::Broadcast {
            data: field_data(f.data)?,
        }),
        "disconnect" => Ok(ApiRequest::Disconnect {
            user: field_str(f.user, "user", ErrorCode::BadUser, valid_user)?,
        }),
        other => Err(ProtoError::new(
            ErrorCode::BadRequest,
            format!("unknown call {other}"),
        )),
    }
}

#[derive(Serialize)]
struct Out<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conn: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a RawValue>,
}

impl Out<'_> {
    const EMPTY: Out<'static> = Out {
        kind: "",
        user: None,
        conn: None,
        from: None,
        room: None,
        id: None,
        delivered: None,
        code: None,
        message: None,
        data: None,
    };

    fn frame(&self, extra: usize) -> Bytes {
        codec::text_frame_with(64 + extra, |buf| {
            // Serializing plain strings and raw JSON into a Vec cannot fail.
            let _ = serde_json::to_writer(buf, self);
        })
    }
}

/// `{"type":"welcome","user":…,"conn":…}` as a frame.
pub fn welcome(user: &str, conn: &str) -> Bytes {
    Out {
        kind: "welcome",
        user: Some(user),
        conn: Some(conn),
        ..Out::EMPTY
    }
    .frame(user.len() + conn.len())
}

/// A delivery: `{"type":"message","from"?,"room"?,"data":…}` as a frame, encoded once for
/// all its recipients.
pub fn message(from: Option<&str>, room: Option<&str>, data: &RawValue) -> Bytes {
    Out {
        kind: "message",
        from,
        room,
        data: Some(data),
        ..Out::EMPTY
    }
    .frame(data.get().len() + 80)
}

/// `{"type":"ack","id":…,"delivered"?:…}` as a frame.
pub fn ack(id: &RawValue, delivered: Option<u64>) -> Bytes {
    Out {
        kind: "ack",
        id: Some(id),
        delivered,
        ..Out::EMPTY
    }
    .frame(id.get().len())
}

/// `{"type":"error","code":…,"message":…,"id"?:…}` as a frame.
pub fn error(id: Option<&RawValue>, err: &ProtoError) -> Bytes {
    Out {
        kind: "error",
        code: Some(err.code.as_str()),
        message: Some(&err.message),
        id,
        ..Out::EMPTY
    }
    .frame(err.message.len() + id.map_or(0, |i| i.get().len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: &Bytes) -> &str {
        let start = if frame[1] < 126 { 2 } else { 4 };
        std::str::from_utf8(&frame[start..]).unwrap()
    }

    #[test]
    fn send_keeps_data_and_id_raw() {
        let p = parse(
            r#"{"type":"send","to":"u1","id":18446744073709551615,"data":{"n":9007199254740993,"f":1.000000000000000000001,"s":"a\u00e9\n"}}"#,
        );
        assert_eq!(p.id.unwrap().get(), "18446744073709551615");
        match p.request.unwrap() {
            Request::Send { to, data } => {
                assert_eq!(to, "u1");
                assert_eq!(
                    data.get(),
                    r#"{"n":9007199254740993,"f":1.000000000000000000001,"s":"a\u00e9\n"}"#
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn null_data_is_a_value_and_missing_data_is_not() {
        let p = parse(r#"{"type":"send","to":"u1","data":null}"#);
        assert!(matches!(p.request, Ok(Request::Send { data, .. }) if data.get() == "null"));
        let p = parse(r#"{"type":"send","to":"u1","id":"x"}"#);
        assert_eq!(p.id.unwrap().get(), "\"x\"");
        assert_eq!(p.request.unwrap_err().code, ErrorCode::BadRequest);
    }

    #[test]
    fn errors_keep_the_id_with_its_type() {
        let p = parse(r#"{"type":"send","to":"bad user!","id":7,"data":1}"#);
        assert_eq!(p.id.unwrap().get(), "7");
        assert_eq!(p.request.unwrap_err().code, ErrorCode::BadUser);
        let p = parse(r#"{"type":"join","room":5,"id":"r"}"#);
        assert_eq!(p.id.unwrap().get(), "\"r\"");
        assert_eq!(p.request.unwrap_err().code, ErrorCode::BadRequest);
        let p = parse(r#"{"type":"nope","id":1}"#);
        assert_eq!(p.request.unwrap_err().code, ErrorCode::BadRequest);
        let p = parse(r#"{"type":"join","room":"","id":1}"#);
        assert_eq!(p.request.unwrap_err().code, ErrorCode::BadRoom);
    }

    #[test]
    fn bad_json_and_non_objects() {
        assert_eq!(parse("{nope").request.unwrap_err().code, ErrorCode::BadJson);
        assert_eq!(
            parse("[1,2]").request.unwrap_err().code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            parse("\"s\"").request.unwrap_err().code,
            ErrorCode::BadRequest
        );
        let p = parse(r#"{"type":"send","to":"a","data":1,"id":{"x":1}}"#);
        assert!(p.id.is_none());
        assert_eq!(p.request.unwrap_err().code, ErrorCode::BadRequest);
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let p = parse(r#"{"type":"s\u0065nd","to":"u\u0031","data":1}"#);
        assert!(matches!(p.request, Ok(Request::Send { to, .. }) if to == "u1"));
    }

    #[test]
    fn user_and_room_syntax() {
        assert!(valid_user("a-Z_0.9:@"));
        assert!(!valid_user(""));
        assert!(!valid_user(&"a".repeat(65)));
        assert!(valid_room(&"a".repeat(128)));
        assert!(!valid_room(&"a".repeat(129)));
        assert!(!valid_user("é"));
        assert!(!valid_user("a b"));
    }

    #[test]
    fn server_messages_have_the_documented_shapes() {
        let data = RawValue::from_string("[1, 2]".into()).unwrap();
        assert_eq!(
            payload(&message(Some("u1"), None, &data)),
            r#"{"type":"message","from":"u1","data":[1, 2]}"#
        );
        assert_eq!(
            payload(&message(None, Some("r"), &data)),
            r#"{"type":"message","room":"r","data":[1, 2]}"#
        );
        let id = RawValue::from_string("\"a\"".into()).unwrap();
        assert_eq!(
            payload(&ack(&id, Some(3))),
            r#"{"type":"ack","id":"a","delivered":3}"#
        );
        assert_eq!(payload(&ack(&id, None)), r#"{"type":"ack","id":"a"}"#);
        assert_eq!(
            payload(&welcome("u1", "c")),
            r#"{"type":"welcome","user":"u1","conn":"c"}"#
        );
        let err = ProtoError::new(ErrorCode::BadJson, "x \"y\"");
        assert_eq!(
            payload(&error(None, &err)),
            r#"{"type":"error","code":"bad_json","message":"x \"y\""}"#
        );
    }
}
