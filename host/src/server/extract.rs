//! Request extraction that turns every client mistake into a problem document: JSON bodies
//! (not JSON, malformed, wrong types, too large, too slow), query strings, and the
//! `Idempotency-Key` and `Prefer: wait` headers. Each accepts exactly what the OpenAPI document
//! says of it.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::Deserialize;
use serde::de::{DeserializeOwned, Deserializer, Error as _};
use sha2::{Digest, Sha256};

use super::AppState;
use super::problem::Problem;

/// A request body sent as `Content-Type: application/json`, read whole within
/// `body_read_timeout_secs` and `max_body_bytes`.
pub struct JsonBytes(pub Bytes);

impl FromRequest<AppState> for JsonBytes {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let content_type = req.headers().get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case("application/json") {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send the body as JSON with `Content-Type: application/json`",
            ));
        }
        let limit = Duration::from_secs(state.config.body_read_timeout_secs);
        let read = tokio::time::timeout(limit, Bytes::from_request(req, state)).await.map_err(|_| {
            Problem::new(
                StatusCode::REQUEST_TIMEOUT,
                "body-timeout",
                format!("the request body did not arrive within {} s; send it whole, at once", limit.as_secs()),
            )
        })?;
        read.map(JsonBytes).map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body-too-large",
                    format!("the request body is larger than the server accepts ({} bytes)", state.config.max_body_bytes),
                )
            } else {
                Problem::bad_request(format!("could not read the request body: {rejection}"))
            }
        })
    }
}

/// Parses a JSON body into `T`; returns it with the SHA-256 of the body re-serialized with
/// sorted keys (so that formatting does not matter to idempotency checks).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, [u8; 32]), Problem> {
    let json: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| Problem::bad_request(format!("the body is not valid JSON: {e}")))?;
    let hash = Sha256::digest(json.to_string().as_bytes()).into();
    let value = serde_json::from_value(json).map_err(|e| Problem::bad_request(format!("the body does not fit: {e}")))?;
    Ok((value, hash))
}

/// A JSON body parsed into `T`, with the hash of [`parse_json`].
pub struct JsonBody<T> {
    /// The parsed body.
    pub value: T,
    /// Hash of the body re-serialized with sorted keys.
    pub hash: [u8; 32],
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let JsonBytes(bytes) = JsonBytes::from_request(req, state).await?;
        let (value, hash) = parse_json(&bytes)?;
        Ok(JsonBody { value, hash })
    }
}

/// The `Idempotency-Key` header, if any: 1 to 255 visible ASCII characters.
pub struct IdempotencyKey(pub Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get("idempotency-key") else { return Ok(IdempotencyKey(None)) };
        match value.to_str() {
            Ok(key) if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) => {
                Ok(IdempotencyKey(Some(key.to_string())))
            }
            _ => Err(Problem::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters (a UUID is a good choice)")),
        }
    }
}

/// `Prefer: wait=N`: how long the client is willing to wait for the run to end, in seconds.
///
/// As RFC 7240 asks, preferences genpipe does not know, and a `wait` it cannot read (not a whole
/// number of at most 9 digits), are ignored: a preference is a hint, never a reason to refuse.
/// Preferences are comma-separated, in one `Prefer` field or several; the first `wait` counts.
pub struct PreferWait(pub Option<u64>);

impl<S: Send + Sync> FromRequestParts<S> for PreferWait {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let wait = parts
            .headers
            .get_all("prefer")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|text| text.split(','))
            .find_map(|preference| {
                let (name, value) = preference.split_once('=')?;
                name.trim().eq_ignore_ascii_case("wait").then(|| value.trim().trim_matches('"'))
            })
            .filter(|digits| digits.len() <= 9)
            .and_then(whole_number);
        Ok(PreferWait(wait))
    }
}

/// A query string parsed into `T`; a mismatch is a 400 problem naming the field.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(QueryParams(value)),
            Err(rejection) => Err(Problem::bad_request(format!("the query string does not fit: {}", rejection.body_text()))),
        }
    }
}

/// A whole number from 0 to 2^64-1 written in decimal digits, and nothing else (no sign, no
/// spaces, no exponent).
pub fn whole_number(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Deserializes an optional query field with [`whole_number`].
pub fn optional_whole_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    whole_number(&text)
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("'{text}' is not a whole number from 0 to {}", u64::MAX)))
}

/// A JSON number as a whole number from 0 to 2^64-1, whether written `12`, `12.0` or `1.2e1`
/// (JSON Schema's `integer` is any number without a fraction).
pub fn json_whole_number(number: &serde_json::Number) -> Option<u64> {
    if let Some(n) = number.as_u64() {
        return Some(n);
    }
    let x = number.as_f64()?;
    // 2^64 is the first float past u64::MAX.
    ((0.0..18_446_744_073_709_551_616.0).contains(&x) && x.fract() == 0.0).then_some(x as u64)
}

/// Deserializes a JSON body field with [`json_whole_number`].
pub fn whole_json_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    json_whole_number(&number).ok_or_else(|| D::Error::custom(format!("{number} is not a whole number from 0 to {}", u64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn prefer(values: &[&str]) -> Option<u64> {
        let mut request = axum::http::Request::builder();
        for value in values {
            request = request.header("prefer", *value);
        }
        let (mut parts, ()) = request.body(()).unwrap().into_parts();
        let Ok(PreferWait(wait)) = PreferWait::from_request_parts(&mut parts, &()).await;
        wait
    }

    #[tokio::test]
    async fn prefer_honours_wait_and_ignores_what_it_cannot_read() {
        assert_eq!(prefer(&["wait=30"]).await, Some(30));
        assert_eq!(prefer(&["respond-async, Wait = 5"]).await, Some(5));
        assert_eq!(prefer(&["handling=lenient", "wait=7"]).await, Some(7));
        assert_eq!(prefer(&["wait=\"12\""]).await, Some(12));
        for ignored in [&[][..], &[""], &["wait=soon"], &["wait=1234567890"], &["wait=-1"], &["return=minimal"]] {
            assert_eq!(prefer(ignored).await, None, "{ignored:?}");
        }
    }
}
