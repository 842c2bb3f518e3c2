//! Outbound HTTP (`wasi:http/outgoing-handler`), only where the plugin's `allowed_hosts` lead.
//!
//! Every request is checked before anything is sent, in this order:
//! 1. it counts against the step's `max_host_calls`;
//! 2. its scheme, host and port must be allowed by `allowed_hosts` ([`AllowedHosts`]);
//! 3. the step may have at most `max_http_connections` requests open;
//! 4. the host resolves the name and checks every address against the entry's rule (no
//!    loopback or metadata address through a name), then connects to those addresses.
//!
//! A refusal answers `error-code::http-request-denied` (or `connection-limit-reached`) and
//! records why in the step's incident: if the step then fails, its error is that reason, of
//! kind `denied`. A redirect is a new request the plugin makes, so it is checked the same way.
//! Each request is bounded by `http_timeout_ms` (connect, first byte, and between bytes) and
//! its response body by `max_http_response_bytes`. Dropping the step's store drops its
//! requests, which closes their connections.

mod allowlist;
mod send;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme as UriScheme;
use tokio::sync::Semaphore;
use tokio_rustls::rustls::pki_types::ServerName;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

pub use allowlist::{AddressRule, AllowedHosts, Scheme};

use crate::runtime::StepFailure;
use crate::runtime::limits::StepLimits;

/// A plugin's outbound HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpPolicy {
    /// Where it may send requests.
    pub allowed: AllowedHosts,
    /// Limit of each phase of a request (connect, first byte, between bytes).
    pub timeout: Duration,
    /// Largest response body it may read.
    pub max_response_bytes: u64,
    /// Requests a step may have open at once.
    pub max_connections: u32,
}

type ResponseFuture = Box<
    dyn Future<Output = Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>), Error>> + Send,
>;

fn refused(error: Error) -> ResponseFuture {
    Box::new(async move { Err(error) })
}

impl WasiHttpHooks for StepLimits {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _response_errors: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> ResponseFuture {
        if self.host_call().is_err() {
            return refused(Error::ConnectionLimitReached);
        }
        let context = self.context();
        let policy = &context.plugin(self.step_index()).http;
        let uri = request.uri();
        let scheme = match uri.scheme() {
            Some(s) if *s == UriScheme::HTTP => Scheme::Http,
            Some(s) if *s == UriScheme::HTTPS => Scheme::Https,
            _ => return refused(Error::HttpProtocolError),
        };
        let Some(host) = uri.host().map(str::to_string) else { return refused(Error::HttpRequestUriInvalid) };
        let port = uri.port_u16().unwrap_or(scheme.default_port());
        let rule = match policy.allowed.check(scheme, &host, port) {
            Ok(rule) => rule,
            Err(why) => {
                self.incident.record(StepFailure::Denied(why));
                return refused(Error::HttpRequestDenied);
            }
        };
        let max = policy.max_connections;
        let open = Arc::clone(self.http_open.get_or_insert_with(|| Arc::new(Semaphore::new(max as usize))));
        let Ok(permit) = open.try_acquire_owned() else {
            self.incident.record(StepFailure::Denied(format!(
                "it opened more than max_http_connections ({max}) HTTP requests at once; \
                 raise max_http_connections or wait for responses before sending more"
            )));
            return refused(Error::ConnectionLimitReached);
        };
        let timeout = |option: Option<Duration>| option.map_or(policy.timeout, |t| t.min(policy.timeout));
        let options = options.unwrap_or_default();
        let phase_limit = [options.connect_timeout, options.first_byte_timeout, options.between_bytes_timeout]
            .into_iter()
            .map(timeout)
            .min()
            .unwrap_or(policy.timeout);
        let max_response_bytes = policy.max_response_bytes;
        let incident = Arc::clone(&self.incident);
        Box::new(async move {
            let addresses = match resolve(&host, port, rule, phase_limit).await {
                Ok(addresses) => addresses,
                Err(Refusal::Denied(why)) => {
                    incident.record(StepFailure::Denied(why));
                    return Err(Error::HttpRequestDenied);
                }
                Err(Refusal::Failed(error)) => return Err(error),
            };
            let tls_name = match scheme {
                Scheme::Https => Some(server_name(&host)?),
                Scheme::Http => None,
            };
            let target = send::Target { addresses, tls_name, timeout: phase_limit, max_response_bytes };
            let (response, connection) = send::send(request, target, permit).await?;
            Ok((response, Box::new(connection) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

enum Refusal {
    Denied(String),
    Failed(Error),
}

/// The addresses of `host` that `rule` allows; every address must pass, so that which one the
/// connection picks does not matter.
async fn resolve(host: &str, port: u16, rule: AddressRule, limit: Duration) -> Result<Vec<SocketAddr>, Refusal> {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<SocketAddr> = match literal.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => match tokio::time::timeout(limit, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(found)) => found.collect(),
            Ok(Err(_)) => return Err(Refusal::Failed(Error::DnsError { rcode: Some("no such host".into()), info_code: None })),
            Err(_) => return Err(Refusal::Failed(Error::DnsTimeout)),
        },
    };
    if addresses.is_empty() {
        return Err(Refusal::Failed(Error::DestinationNotFound));
    }
    for address in &addresses {
        if let Some(why) = rule.refuses(address.ip()) {
            return Err(Refusal::Denied(format!(
                "{host} resolves to {}, {why}; only an allowed_hosts entry that names that address \
                 (or `localhost`) may reach it",
                address.ip()
            )));
        }
    }
    Ok(addresses)
}

fn server_name(host: &str) -> Result<ServerName<'static>, Error> {
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    match literal.parse::<IpAddr>() {
        Ok(ip) => Ok(ServerName::from(ip)),
        Err(_) => ServerName::try_from(host.to_string()).map_err(Error::InvalidDnsNameError),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused_unless_an_entry_names_it() {
        let limit = Duration::from_secs(5);
        match resolve("localhost", 8080, AddressRule::NotLocal, limit).await {
            Err(Refusal::Denied(why)) => assert!(why.starts_with("localhost resolves to ") && why.contains("loopback"), "{why}"),
            _ => panic!("a name leading to loopback must be refused"),
        }
        let allowed = resolve("localhost", 8080, AddressRule::Any, limit).await.ok().expect("`localhost` named itself");
        assert!(allowed.iter().all(|a| a.ip().is_loopback() && a.port() == 8080));
        let literal = resolve("[::1]", 9, AddressRule::Any, limit).await.ok().expect("an IP literal needs no lookup");
        assert_eq!(literal, vec!["[::1]:9".parse().unwrap()]);
    }
}
