//! Outbound HTTP from a plugin, over `wasi:http/outgoing-handler`.
//!
//! The host sends a request only to the hosts the operator listed in the plugin's
//! `allowed_hosts`; anything else fails with [`HttpError::Denied`] before a byte is sent.
//! Requests block the plugin until the answer's head arrives; the body can be read whole
//! ([`Response::bytes`], [`Response::text`]) or chunk by chunk as it arrives
//! ([`Response::next_chunk`]), which is how a plugin streams a model's tokens.
//!
//! ```ignore
//! use genpipe_plugin_sdk::http::Request;
//!
//! let answer = Request::post("http://127.0.0.1:8000/v1/chat/completions")
//!     .header("content-type", "application/json")
//!     .body(br#"{"model":"m","messages":[]}"#.to_vec())
//!     .send()?
//!     .text()?;
//! ```

use std::fmt;
use std::time::Duration;

use crate::StepError;
use crate::llm::wasi::http::outgoing_handler;
use crate::llm::wasi::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingResponse, Method, OutgoingBody, OutgoingRequest, RequestOptions, Scheme,
};
use crate::llm::wasi::io::streams::{InputStream, StreamError};

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The host refused the request: the URL is not in the plugin's `allowed_hosts`, or the
    /// step has too many requests open.
    Denied(String),
    /// The URL could not be understood.
    InvalidUrl(String),
    /// The request timed out (connecting, waiting for the answer, or between chunks).
    Timeout,
    /// The response body passed the host's `max_http_response_bytes`.
    TooLarge,
    /// Anything else: the connection failed, the server broke the protocol...
    Failed(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(why) => write!(f, "the host denied the request: {why}"),
            HttpError::InvalidUrl(why) => write!(f, "invalid URL: {why}"),
            HttpError::Timeout => f.write_str("the request timed out"),
            HttpError::TooLarge => f.write_str("the response was larger than the host allows"),
            HttpError::Failed(why) => write!(f, "the request failed: {why}"),
        }
    }
}

impl From<HttpError> for StepError {
    fn from(error: HttpError) -> StepError {
        StepError::Upstream(error.to_string())
    }
}

impl From<ErrorCode> for HttpError {
    fn from(code: ErrorCode) -> HttpError {
        match code {
            ErrorCode::HttpRequestDenied => HttpError::Denied("not in this plugin's allowed_hosts".into()),
            ErrorCode::ConnectionLimitReached => HttpError::Denied("too many requests open at once".into()),
            ErrorCode::ConnectionTimeout | ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => {
                HttpError::Timeout
            }
            ErrorCode::HttpResponseBodySize(_) => HttpError::TooLarge,
            other => HttpError::Failed(format!("{other:?}")),
        }
    }
}

/// A request being built.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    timeout: Option<Duration>,
}

impl Request {
    /// A GET of `url`.
    pub fn get(url: &str) -> Request {
        Request::new(Method::Get, url)
    }

    /// A POST to `url`.
    pub fn post(url: &str) -> Request {
        Request::new(Method::Post, url)
    }

    fn new(method: Method, url: &str) -> Request {
        Request { method, url: url.to_string(), headers: Vec::new(), body: Vec::new(), timeout: None }
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> Request {
        self.headers.push((name.to_ascii_lowercase(), value.as_bytes().to_vec()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: Vec<u8>) -> Request {
        self.body = body;
        self
    }

    /// Limits connecting, the wait for the answer, and each wait between chunks (the host's
    /// own `http_timeout_ms` applies too: the shorter wins).
    pub fn timeout(mut self, timeout: Duration) -> Request {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the request and waits for the answer's status and headers.
    pub fn send(self) -> Result<Response, HttpError> {
        let (scheme, authority, path) = split_url(&self.url)?;
        let headers = Fields::from_list(&self.headers).map_err(|e| HttpError::Failed(format!("bad header: {e:?}")))?;
        let request = OutgoingRequest::new(headers);
        let invalid = |what: &str| HttpError::InvalidUrl(format!("{what} of '{}'", self.url));
        request.set_method(&self.method).map_err(|()| invalid("the method"))?;
        request.set_scheme(Some(&scheme)).map_err(|()| invalid("the scheme"))?;
        request.set_authority(Some(authority)).map_err(|()| invalid("the host"))?;
        request.set_path_with_query(Some(path)).map_err(|()| invalid("the path"))?;
        let body = request.body().map_err(|()| HttpError::Failed("the request body is unavailable".into()))?;
        let options = self.timeout.map(|timeout| {
            let options = RequestOptions::new();
            let nanos = Some(timeout.as_nanos().min(u128::from(u64::MAX)) as u64);
            let _ = options.set_connect_timeout(nanos);
            let _ = options.set_first_byte_timeout(nanos);
            let _ = options.set_between_bytes_timeout(nanos);
            options
        });
        let future = outgoing_handler::handle(request, options)?;
        write_body(&body, &self.body)?;
        OutgoingBody::finish(body, None)?;
        future.subscribe().block();
        let response = match future.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(code.into()),
            Some(Err(())) | None => return Err(HttpError::Failed("the response was already taken".into())),
        };
        Response::new(response)
    }
}

fn write_body(body: &OutgoingBody, bytes: &[u8]) -> Result<(), HttpError> {
    if bytes.is_empty() {
        return Ok(());
    }
    let stream = body.write().map_err(|()| HttpError::Failed("the request body is unavailable".into()))?;
    for chunk in bytes.chunks(4096) {
        stream.blocking_write_and_flush(chunk).map_err(|e| HttpError::Failed(format!("sending the body: {e:?}")))?;
    }
    Ok(())
}

/// Splits `scheme://authority/path?query`.
fn split_url(url: &str) -> Result<(Scheme, &str, &str), HttpError> {
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", rest)) => (Scheme::Http, rest),
        Some(("https", rest)) => (Scheme::Https, rest),
        _ => return Err(HttpError::InvalidUrl(format!("'{url}' must start with http:// or https://"))),
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.is_empty() {
        return Err(HttpError::InvalidUrl(format!("'{url}' has no host")));
    }
    Ok((scheme, authority, if path.is_empty() { "/" } else { path }))
}

/// An answer: its status and headers at once, its body as it arrives.
pub struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    // Dropped in this order: the stream before its body, the body before its response.
    stream: InputStream,
    _body: IncomingBody,
    _response: IncomingResponse,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response").field("status", &self.status).field("headers", &self.headers).finish_non_exhaustive()
    }
}

impl Response {
    fn new(response: IncomingResponse) -> Result<Response, HttpError> {
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(name, value)| (name, String::from_utf8_lossy(&value).into_owned()))
            .collect();
        let body = response.consume().map_err(|()| HttpError::Failed("the response body is unavailable".into()))?;
        let stream = body.stream().map_err(|()| HttpError::Failed("the response body is unavailable".into()))?;
        Ok(Response { status, headers, stream, _body: body, _response: response })
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The next chunk of the body as it arrives, or `None` at its end.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, HttpError> {
        loop {
            match self.stream.blocking_read(64 * 1024) {
                Ok(bytes) if bytes.is_empty() => continue,
                Ok(bytes) => return Ok(Some(bytes)),
                Err(StreamError::Closed) => return Ok(None),
                Err(StreamError::LastOperationFailed(error)) => {
                    let code = crate::llm::wasi::http::types::http_error_code(&error);
                    return Err(code.map_or_else(|| HttpError::Failed(error.to_debug_string()), HttpError::from));
                }
            }
        }
    }

    /// The whole body.
    pub fn bytes(mut self) -> Result<Vec<u8>, HttpError> {
        let mut body = Vec::new();
        while let Some(chunk) = self.next_chunk()? {
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// The whole body as text (invalid UTF-8 replaced).
    pub fn text(self) -> Result<String, HttpError> {
        Ok(String::from_utf8_lossy(&self.bytes()?).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let (scheme, authority, path) = split_url("http://127.0.0.1:8080/v1/x?y=1").unwrap();
        assert!(matches!(scheme, Scheme::Http));
        assert_eq!((authority, path), ("127.0.0.1:8080", "/v1/x?y=1"));
        assert_eq!(split_url("https://example.com").map(|(_, a, p)| (a, p)).unwrap(), ("example.com", "/"));
        assert!(split_url("ftp://example.com").is_err());
        assert!(split_url("http:///x").is_err());
    }
}
