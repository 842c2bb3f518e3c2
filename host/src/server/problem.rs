//! Errors as `application/problem+json` (RFC 9457): every refusal says what was wrong and what
//! to do, with the HTTP status DESIGN.md's error model gives it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::StartError;

/// A problem document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URN naming the kind of problem, e.g. `urn:genpipe:problem:insufficient-credits`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong this time and how to fix it.
    pub detail: String,
    /// Seconds to wait before retrying, for 429 and 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

impl Problem {
    /// A problem of `status`, kind `slug`, with `detail`.
    pub fn new(status: StatusCode, slug: &str, detail: impl Into<String>) -> Problem {
        Problem {
            kind: format!("urn:genpipe:problem:{slug}"),
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// 400: the request is malformed.
    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, "bad-request", detail)
    }

    /// 404: no such resource, or not the caller's.
    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not-found", detail)
    }

    /// Adds a `Retry-After`.
    pub fn retry_after(mut self, seconds: u64) -> Problem {
        self.retry_after = Some(seconds);
        self
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = self.status();
        let retry_after = self.retry_after;
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(seconds) = retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StartError> for Problem {
    fn from(error: StartError) -> Problem {
        let detail = error.to_string();
        match error {
            StartError::UnknownPipeline { .. } => Problem::new(StatusCode::NOT_FOUND, "unknown-pipeline", detail),
            StartError::InvalidParams { .. } => Problem::new(StatusCode::BAD_REQUEST, "invalid-params", detail),
            StartError::InsufficientCredits { .. } => Problem::new(
                StatusCode::PAYMENT_REQUIRED,
                "insufficient-credits",
                format!("{detail}; ask an administrator for a grant or use a cheaper pipeline"),
            ),
            StartError::UnknownAccount(_) => Problem::new(
                StatusCode::PAYMENT_REQUIRED,
                "insufficient-credits",
                "the account has no credits yet; ask for a grant",
            ),
            StartError::AtCapacity { .. } => {
                Problem::new(StatusCode::TOO_MANY_REQUESTS, "at-capacity", format!("{detail}; retry after the Retry-After delay"))
                    .retry_after(1)
            }
            StartError::Ledger(_) => Problem::new(StatusCode::SERVICE_UNAVAILABLE, "ledger-unavailable", detail).retry_after(1),
        }
    }
}
