//! Request extraction that turns every client mistake into a problem document: JSON bodies
//! (malformed, wrong types, too large), the `Idempotency-Key` and `Prefer: wait` headers.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::problem::Problem;

/// A JSON body, with the SHA-256 of its canonical form (for idempotency checks).
pub struct JsonBody<T> {
    /// The parsed body.
    pub value: T,
    /// Hash of the body re-serialized with sorted keys, so formatting does not matter.
    pub hash: [u8; 32],
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req.headers().get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !content_type.starts_with("application/json") {
            return Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                "send the body as JSON with `Content-Type: application/json`",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body-too-large",
                    "the request body is larger than the server accepts",
                )
            } else {
                Problem::bad_request(format!("could not read the request body: {rejection}"))
            }
        })?;
        let json: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| Problem::bad_request(format!("the body is not valid JSON: {e}")))?;
        let hash = Sha256::digest(json.to_string().as_bytes()).into();
        let value = serde_json::from_value(json).map_err(|e| Problem::bad_request(format!("the body does not fit: {e}")))?;
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

/// `Prefer: wait=N`: how long the client is willing to wait for the run to end.
pub struct PreferWait(pub Option<u64>);

impl<S: Send + Sync> FromRequestParts<S> for PreferWait {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        for value in parts.headers.get_all("prefer") {
            let text = value.to_str().map_err(|_| Problem::bad_request("the Prefer header is not readable text"))?;
            for preference in text.split([',', ';']).map(str::trim) {
                if let Some(seconds) = preference.strip_prefix("wait=") {
                    let seconds = seconds
                        .parse()
                        .map_err(|_| Problem::bad_request(format!("Prefer: wait={seconds} must be a whole number of seconds")))?;
                    return Ok(PreferWait(Some(seconds)));
                }
            }
        }
        Ok(PreferWait(None))
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
