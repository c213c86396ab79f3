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
    /// `sub` is missing or not a valid user id.
    #[error("token `sub` must be a user id (1-64 bytes of A-Z a-z 0-9 _ - . : @)")]
    Subject,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    exp: Option<f64>,
}

/// A verified identity.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    /// The user id (`sub`).
    pub user: String,
    /// When the token expires (`exp`), as seconds since the Unix epoch.
    pub expires_at: Option<f64>,
}

impl Identity {
    /// Time left until expiry, if the token has an `exp`.
    pub fn remaining(&self) -> Option<Duration> {
        let exp = self.expires_at?;
        let now = unix_now();
        Some(Duration::from_secs_f64((exp - now).max(0.0)))
    }
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
    if let Some(exp) = claims.exp {
        if unix_now() > exp + leeway.as_secs_f64() {
            return Err(TokenError::Expired);
        }
    }
    let user = claims
        .sub
        .filter(|s| valid_user(s))
        .ok_or(TokenError::Subject)?;
    Ok(Identity {
        user,
        expires_at: claims.exp,
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
    fn api_key_comparison() {
        assert!(api_key_matches("k1", "k1"));
        assert!(!api_key_matches("k2", "k1"));
        assert!(!api_key_matches("", "k1"));
    }
}
