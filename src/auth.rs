//! Identity and API authorization: HS256 JWTs and the API key.
//!
//! Only `HS256` is accepted: a token whose header names any other algorithm (`none`,
//! `HS512`, `RS256`, ...) is refused before its signature is looked at. The signature check
//! is `hmac`'s constant-time `verify_slice`. The JWT shape is parsed here rather than with the
//! `jsonwebtoken` crate because its current versions require an RSA/ECDSA crypto backend we
//! would never use; the cryptography itself is the `hmac` and `sha2` crates'.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::protocol::valid_user;

/// Why a token was refused (the message goes into the 401 answer).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not three base64url parts of JSON.
    #[error("malformed token")]
    Malformed,
    /// `alg` is not HS256.
    #[error("token algorithm must be HS256")]
    Algorithm,
    /// The signature does not match the secret.
    #[error("bad token signature")]
    Signature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    /// A time claim (`exp`, `nbf`, `iat`) is not a number of seconds since the Unix epoch.
    #[error("token claim `{0}` must be a number (seconds since the Unix epoch)")]
    Claim(&'static str),
    /// `sub` is missing or not a valid user id.
    #[error("token `sub` must be a user id (1-64 bytes of A-Z a-z 0-9 _ - . : @)")]
    Subject,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// The claims we read. Time claims are taken as any JSON value and checked by hand, so a
/// string, a boolean, a huge or a negative number is a clear refusal or a saturated time,
/// never a panic in later arithmetic.
#[derive(Deserialize)]
struct Claims {
    sub: Option<serde_json::Value>,
    exp: Option<serde_json::Value>,
    nbf: Option<serde_json::Value>,
    iat: Option<serde_json::Value>,
}

/// Reads a NumericDate claim (RFC 7519 §2): a JSON number of seconds, possibly fractional.
/// Any number is accepted, however large or small (`1e300` or JavaScript's
/// `Number.MAX_VALUE` as "never"); everything else is refused.
fn numeric_date(
    name: &'static str,
    v: &Option<serde_json::Value>,
) -> Result<Option<f64>, TokenError> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::Number(n)) => match n.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(TokenError::Claim(name)),
        },
        Some(_) => Err(TokenError::Claim(name)),
    }
}

/// The most a token's remaining lifetime is taken to be: a century is "never" for a
/// connection, and every deadline computed from it stays far from overflowing.
pub const MAX_LIFETIME: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A verified identity.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The user id (`sub`).
    pub user: String,
    /// When the connection must end: the token's `exp` plus the leeway, as seconds since the
    /// Unix epoch.
    pub expires_at: Option<f64>,
}

impl Identity {
    /// Time left until expiry, if the token has an `exp`: zero when it is past, at most
    /// [`MAX_LIFETIME`]. Never panics, whatever the claim held.
    pub fn remaining(&self) -> Option<Duration> {
        let exp = self.expires_at?;
        Some(seconds_to_duration(exp - unix_now()))
    }
}

/// A number of seconds as a duration, clamped to `0..=MAX_LIFETIME` (NaN is zero).
pub fn seconds_to_duration(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        return Duration::ZERO;
    }
    Duration::try_from_secs_f64(secs)
        .unwrap_or(MAX_LIFETIME)
        .min(MAX_LIFETIME)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Verifies an HS256 token against `secret`, allowing `leeway` of clock skew on `exp`.
pub fn verify_jwt(token: &str, secret: &[u8], leeway: Duration) -> Result<Identity, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let header: Header = decode_json(h)?;
    if header.alg != "HS256" {
        return Err(TokenError::Algorithm);
    }
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TokenError::Malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| TokenError::Signature)?;
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(c.as_bytes());
    mac.verify_slice(&sig).map_err(|_| TokenError::Signature)?;
    let claims: Claims = decode_json(c)?;
    let exp = numeric_date("exp", &claims.exp)?;
    let nbf = numeric_date("nbf", &claims.nbf)?;
    // `iat` is informational, but a malformed one is a malformed token.
    numeric_date("iat", &claims.iat)?;
    let now = unix_now();
    let leeway = leeway.as_secs_f64();
    // Comparisons of finite floats: no arithmetic here can overflow or panic (a sum of two
    // finite doubles at worst becomes infinity, which compares correctly).
    if let Some(exp) = exp {
        if now > exp + leeway {
            return Err(TokenError::Expired);
        }
    }
    if let Some(nbf) = nbf {
        if now + leeway < nbf {
            return Err(TokenError::NotYetValid);
        }
    }
    let user = match claims.sub {
        Some(serde_json::Value::String(s)) if valid_user(&s) => s,
        _ => return Err(TokenError::Subject),
    };
    Ok(Identity {
        user,
        // The same leeway applies while connected: a token accepted within the leeway after
        // its `exp` is not closed by the next sweep.
        expires_at: exp.map(|e| e + leeway),
    })
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
}

/// Signs an HS256 token (for tests and tools).
pub fn sign_jwt(claims: &serde_json::Value, secret: &[u8]) -> String {
    sign_with_header(r#"{"alg":"HS256","typ":"JWT"}"#, claims, secret)
}

/// Signs with an arbitrary header (tests use it to forge other algorithms).
pub fn sign_with_header(header: &str, claims: &serde_json::Value, secret: &[u8]) -> String {
    let h = URL_SAFE_NO_PAD.encode(header);
    let c = URL_SAFE_NO_PAD.encode(claims.to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(c.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{h}.{c}.{sig}")
}

/// Compares a presented API key with the configured one in constant time (HMAC both with a
/// fixed key and compare the tags, so neither length nor content leaks through timing).
pub fn api_key_matches(presented: &str, expected: &str) -> bool {
    let tag = |s: &str| {
        let mut m = Hmac::<Sha256>::new_from_slice(b"wsgate api key").expect("any key length");
        m.update(s.as_bytes());
        m
    };
    let expected_tag = tag(expected).finalize().into_bytes();
    tag(presented).verify_slice(&expected_tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const S: &[u8] = b"secret";
    const L: Duration = Duration::from_secs(5);

    #[test]
    fn valid_tokens_give_the_subject() {
        let t = sign_jwt(&json!({"sub": "u1", "exp": unix_now() + 60.0}), S);
        let id = verify_jwt(&t, S, L).unwrap();
        assert_eq!(id.user, "u1");
        assert!(id.remaining().unwrap() > Duration::from_secs(50));
        // No exp: accepted, never expires.
        let t = sign_jwt(&json!({"sub": "u2"}), S);
        assert_eq!(verify_jwt(&t, S, L).unwrap().remaining(), None);
    }

    #[test]
    fn every_bad_token_is_refused() {
        let t = sign_jwt(&json!({"sub": "u1", "exp": unix_now() - 60.0}), S);
        assert_eq!(verify_jwt(&t, S, L), Err(TokenError::Expired));
        // Within the leeway.
        let t = sign_jwt(&json!({"sub": "u1", "exp": unix_now() - 1.0}), S);
        assert!(verify_jwt(&t, S, L).is_ok());
        let t = sign_jwt(&json!({"sub": "u1"}), b"other");
        assert_eq!(verify_jwt(&t, S, L), Err(TokenError::Signature));
        let t = sign_with_header(r#"{"alg":"none"}"#, &json!({"sub": "u1"}), S);
        assert_eq!(verify_jwt(&t, S, L), Err(TokenError::Algorithm));
        let unsigned = format!("{}.", t.rsplit_once('.').unwrap().0);
        assert_eq!(verify_jwt(&unsigned, S, L), Err(TokenError::Algorithm));
        let t = sign_with_header(r#"{"alg":"HS512"}"#, &json!({"sub": "u1"}), S);
        assert_eq!(verify_jwt(&t, S, L), Err(TokenError::Algorithm));
        let t = sign_jwt(&json!({"sub": "not valid"}), S);
        assert_eq!(verify_jwt(&t, S, L), Err(TokenError::Subject));
        let t = sign_jwt(&json!({"name": "x"}), S);
        assert_eq!(verify_jwt(&t, S, L), Err(TokenError::Subject));
        assert_eq!(verify_jwt("a.b", S, L), Err(TokenError::Malformed));
        assert_eq!(verify_jwt("!!.??.**", S, L), Err(TokenError::Malformed));
    }

    #[test]
    fn any_time_claim_is_refused_or_saturated_never_a_panic() {
        // "Never expires" written as a huge number: accepted, capped lifetime.
        for exp in [json!(1e20), json!(f64::MAX), json!(u64::MAX), json!(1e300)] {
            let t = sign_jwt(&json!({"sub": "u1", "exp": exp}), S);
            let id = verify_jwt(&t, S, L).unwrap();
            assert_eq!(id.remaining(), Some(MAX_LIFETIME), "exp {exp}");
        }
        // Far in the past, negative, zero: expired.
        for exp in [json!(-1e300), json!(-f64::MAX), json!(0), json!(i64::MIN)] {
            let t = sign_jwt(&json!({"sub": "u1", "exp": exp}), S);
            assert_eq!(verify_jwt(&t, S, L), Err(TokenError::Expired), "exp {exp}");
        }
        // Wrong types are refused by name.
        for (claim, v) in [
            ("exp", json!("tomorrow")),
            ("exp", json!(true)),
            ("exp", json!([1])),
            ("nbf", json!({"a": 1})),
            ("iat", json!("now")),
        ] {
            let t = sign_jwt(&json!({"sub": "u1", claim: v}), S);
            let e = verify_jwt(&t, S, L).unwrap_err();
            assert_eq!(e, TokenError::Claim(claim));
        }
        // A null claim is an absent one.
        let t = sign_jwt(&json!({"sub": "u1", "exp": null}), S);
        assert_eq!(verify_jwt(&t, S, L).unwrap().remaining(), None);
        // nbf: in the future beyond the leeway is refused; huge values too; within it passes.
        let t = sign_jwt(&json!({"sub": "u1", "nbf": unix_now() + 60.0}), S);
        assert_eq!(verify_jwt(&t, S, L), Err(TokenError::NotYetValid));
        let t = sign_jwt(&json!({"sub": "u1", "nbf": f64::MAX}), S);
        assert_eq!(verify_jwt(&t, S, L), Err(TokenError::NotYetValid));
        let t = sign_jwt(&json!({"sub": "u1", "nbf": unix_now() + 2.0, "iat": -5}), S);
        assert!(verify_jwt(&t, S, L).is_ok());
        // A numeric or missing subject is refused.
        let t = sign_jwt(&json!({"sub": 1001}), S);
        assert_eq!(verify_jwt(&t, S, L), Err(TokenError::Subject));
    }

    #[test]
    fn the_leeway_holds_while_connected() {
        // Accepted 2 s after its exp thanks to a 5 s leeway: about 3 s left, not zero.
        let t = sign_jwt(&json!({"sub": "u1", "exp": unix_now() - 2.0}), S);
        let left = verify_jwt(&t, S, L).unwrap().remaining().unwrap();
        assert!(
            left > Duration::from_secs(2) && left <= Duration::from_secs(3),
            "{left:?}"
        );
    }

    #[test]
    fn seconds_to_duration_clamps() {
        assert_eq!(seconds_to_duration(f64::NAN), Duration::ZERO);
        assert_eq!(seconds_to_duration(-1.0), Duration::ZERO);
        assert_eq!(seconds_to_duration(f64::INFINITY), MAX_LIFETIME);
        assert_eq!(seconds_to_duration(1.5), Duration::from_millis(1500));
    }

    #[test]
    fn api_key_comparison() {
        assert!(api_key_matches("k1", "k1"));
        assert!(!api_key_matches("k2", "k1"));
        assert!(!api_key_matches("", "k1"));
    }
}
