//! `allowed_hosts`: where one plugin may send HTTP requests.
//!
//! An entry is `[SCHEME://]HOST[:PORT]`:
//! - `HOST` is a name (`api.openai.com`, `localhost`), an IP literal (`127.0.0.1`, `[::1]`) or
//!   `*.NAME`, any subdomain of NAME (not NAME itself). Names compare case-insensitively.
//! - `PORT` is a number, or `*` for any port; without it, the scheme's default port (443 for
//!   https, 80 for http).
//! - `SCHEME` (`http` or `https`) restricts the entry to that scheme; without it, both.
//!
//! The list is empty by default: a plugin may reach nothing. A request that no entry allows is
//! refused before any connection is made, with a message that says what to add.
//!
//! Names are resolved by the host, which then connects to the addresses it checked (never
//! resolving twice). A name may not lead to the host itself or its cloud metadata service:
//! loopback, link-local and unspecified addresses are refused unless the entry that allowed the
//! request names the address (an IP literal) or is `localhost`. A wildcard entry, which lets
//! whoever controls that domain's DNS choose the address, is refused private addresses too.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The parsed `allowed_hosts` of one plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedHosts {
    entries: Vec<Entry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    scheme: Option<Scheme>,
    host: HostPattern,
    port: PortPattern,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPattern {
    /// A name or an IP literal, lower-cased, IPv6 without brackets.
    Exact(String),
    /// `*.example.com`, kept as `.example.com`.
    Subdomains(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortPattern {
    Default,
    Exact(u16),
    Any,
}

/// The schemes outbound HTTP supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `http://`, port 80 by default.
    Http,
    /// `https://`, port 443 by default.
    Https,
}

impl Scheme {
    /// The port a URL of this scheme uses when it names none.
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        })
    }
}

/// Which addresses a request allowed by an entry may connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRule {
    /// Any address: the entry names an IP literal or `localhost`.
    Any,
    /// No loopback, link-local or unspecified address: the entry names a host.
    NotLocal,
    /// Public addresses only: the entry is a wildcard.
    PublicOnly,
}

impl AddressRule {
    /// Why `ip` is refused under this rule, if it is.
    pub fn refuses(self, ip: IpAddr) -> Option<&'static str> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match self {
            AddressRule::Any => None,
            AddressRule::NotLocal => is_local(ip).then_some("a loopback, link-local or unspecified address"),
            AddressRule::PublicOnly => {
                if is_local(ip) {
                    Some("a loopback, link-local or unspecified address")
                } else if is_private(ip) {
                    Some("a private address, which a wildcard entry may not reach")
                } else {
                    None
                }
            }
        }
    }
}

fn is_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified() || v4.is_broadcast(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_private() || v4.is_multicast() || (a == 100 && (64..128).contains(&b)) || a == 0 || a >= 240
        }
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00 || v6.is_multicast(),
    }
}

impl AllowedHosts {
    /// Parses the entries of `allowed_hosts`; the error names the entry and the fix.
    pub fn parse(entries: &[String]) -> Result<AllowedHosts, String> {
        let entries = entries.iter().map(|entry| parse_entry(entry)).collect::<Result<_, _>>()?;
        Ok(AllowedHosts { entries })
    }

    /// True when the list allows nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks a request to `scheme://host:port` (`host` as in the URL: IPv6 in brackets).
    /// Allowed: the rule for the addresses it may connect to. Refused: why, and what to add.
    pub fn check(&self, scheme: Scheme, host: &str, port: u16) -> Result<AddressRule, String> {
        let host = normalise_host(host);
        let mut rule = None;
        for entry in &self.entries {
            if entry.scheme.is_some_and(|s| s != scheme) {
                continue;
            }
            let port_ok = match entry.port {
                PortPattern::Default => port == scheme.default_port(),
                PortPattern::Exact(p) => port == p,
                PortPattern::Any => true,
            };
            if !port_ok {
                continue;
            }
            let entry_rule = match &entry.host {
                HostPattern::Exact(name) if *name == host => {
                    if name == "localhost" || name.parse::<IpAddr>().is_ok() {
                        AddressRule::Any
                    } else {
                        AddressRule::NotLocal
                    }
                }
                HostPattern::Subdomains(suffix) if host.ends_with(suffix.as_str()) && host.len() > suffix.len() => {
                    AddressRule::PublicOnly
                }
                _ => continue,
            };
            // The most permissive entry that matches decides.
            rule = Some(match (rule, entry_rule) {
                (Some(AddressRule::Any), _) | (_, AddressRule::Any) => AddressRule::Any,
                (Some(AddressRule::NotLocal), _) | (_, AddressRule::NotLocal) => AddressRule::NotLocal,
                _ => AddressRule::PublicOnly,
            });
        }
        rule.ok_or_else(|| {
            let shown = if host.contains(':') { format!("[{host}]") } else { host.clone() };
            let suggestion = if port == scheme.default_port() { shown.clone() } else { format!("{shown}:{port}") };
            if self.entries.is_empty() {
                format!(
                    "{scheme}://{shown}:{port} is not allowed: this plugin's allowed_hosts is empty; \
                     add \"{suggestion}\" to it to allow this host"
                )
            } else {
                format!("{scheme}://{shown}:{port} is not in this plugin's allowed_hosts; add \"{suggestion}\" to allow it")
            }
        })
    }
}

/// Lower-cases a host and strips an IPv6 literal's brackets.
fn normalise_host(host: &str) -> String {
    host.trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase()
}

fn parse_entry(entry: &str) -> Result<Entry, String> {
    let fail = |why: &str| {
        Err(format!("entry \"{entry}\" {why}; write HOST, HOST:PORT, HOST:* or *.DOMAIN, optionally after http:// or https://"))
    };
    let (scheme, rest) = match entry.split_once("://") {
        Some(("http", rest)) => (Some(Scheme::Http), rest),
        Some(("https", rest)) => (Some(Scheme::Https), rest),
        Some(_) => return fail("has a scheme other than http or https"),
        None => (None, entry),
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return fail("is not a host (no paths, users or spaces)");
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        match v6.split_once(']') {
            Some((addr, "")) => (addr, None),
            Some((addr, port)) if port.starts_with(':') => (addr, Some(&port[1..])),
            _ => return fail("has an unclosed IPv6 bracket"),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    let port = match port {
        None => PortPattern::Default,
        Some("*") => PortPattern::Any,
        Some(port) => match port.parse::<u16>() {
            Ok(p) if p > 0 => PortPattern::Exact(p),
            _ => return fail("has a port that is not 1 to 65535 or *"),
        },
    };
    let host = host.to_ascii_lowercase();
    let host = if host == "*" {
        return fail("allows every host: list the hosts the plugin needs instead");
    } else if let Some(domain) = host.strip_prefix("*.") {
        if !valid_name(domain) {
            return fail("has a wildcard that is not followed by a domain name");
        }
        HostPattern::Subdomains(format!(".{domain}"))
    } else if host.parse::<Ipv4Addr>().is_ok() || (entry.contains('[') && host.parse::<Ipv6Addr>().is_ok()) || valid_name(&host) {
        HostPattern::Exact(host)
    } else {
        return fail("is not a valid host name");
    };
    Ok(Entry { scheme, host, port })
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(entries: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn an_empty_list_refuses_everything_and_says_what_to_add() {
        let error = hosts(&[]).check(Scheme::Https, "api.openai.com", 443).unwrap_err();
        assert_eq!(
            error,
            "https://api.openai.com:443 is not allowed: this plugin's allowed_hosts is empty; \
             add \"api.openai.com\" to it to allow this host"
        );
    }

    #[test]
    fn a_host_entry_allows_its_default_ports_only() {
        let list = hosts(&["api.openai.com"]);
        assert_eq!(list.check(Scheme::Https, "API.openai.com", 443), Ok(AddressRule::NotLocal));
        assert_eq!(list.check(Scheme::Http, "api.openai.com", 80), Ok(AddressRule::NotLocal));
        let error = list.check(Scheme::Https, "api.openai.com", 8443).unwrap_err();
        assert!(error.contains("add \"api.openai.com:8443\""), "{error}");
        assert!(list.check(Scheme::Https, "evil.com", 443).is_err());
        assert!(list.check(Scheme::Https, "api.openai.com.evil.com", 443).is_err());
    }

    #[test]
    fn ports_schemes_and_wildcards() {
        let list = hosts(&["127.0.0.1:8080", "localhost:*", "https://*.example.com", "[::1]:9000"]);
        assert_eq!(list.check(Scheme::Http, "127.0.0.1", 8080), Ok(AddressRule::Any));
        assert!(list.check(Scheme::Http, "127.0.0.1", 8081).is_err());
        assert_eq!(list.check(Scheme::Http, "localhost", 1234), Ok(AddressRule::Any));
        assert_eq!(list.check(Scheme::Https, "a.b.example.com", 443), Ok(AddressRule::PublicOnly));
        assert!(list.check(Scheme::Http, "a.example.com", 80).is_err(), "the entry is https only");
        assert!(list.check(Scheme::Https, "example.com", 443).is_err(), "a wildcard is for subdomains");
        assert!(list.check(Scheme::Https, "badexample.com", 443).is_err());
        assert_eq!(list.check(Scheme::Http, "[::1]", 9000), Ok(AddressRule::Any));
    }

    #[test]
    fn names_may_not_lead_to_the_host_itself() {
        let loopback: IpAddr = "127.0.0.1".parse().unwrap();
        let metadata: IpAddr = "169.254.169.254".parse().unwrap();
        let private: IpAddr = "10.1.2.3".parse().unwrap();
        let public: IpAddr = "93.184.216.34".parse().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(AddressRule::NotLocal.refuses(loopback).is_some());
        assert!(AddressRule::NotLocal.refuses(metadata).is_some());
        assert!(AddressRule::NotLocal.refuses(mapped).is_some());
        assert_eq!(AddressRule::NotLocal.refuses(private), None, "a named internal server is the operator's choice");
        assert!(AddressRule::PublicOnly.refuses(private).is_some());
        assert_eq!(AddressRule::PublicOnly.refuses(public), None);
        assert_eq!(AddressRule::Any.refuses(loopback), None);
    }

    #[test]
    fn bad_entries_are_refused_with_the_fix() {
        for (entry, why) in [
            ("*", "allows every host"),
            ("ftp://x.com", "scheme other than http or https"),
            ("x.com/v1", "not a host"),
            ("x.com:0", "port that is not 1 to 65535"),
            ("x.com:http", "port that is not"),
            ("*.", "wildcard that is not followed"),
            ("bad_name.com", "not a valid host name"),
            ("[::1", "unclosed IPv6 bracket"),
            ("", "not a host"),
        ] {
            let error = AllowedHosts::parse(&[entry.to_string()]).unwrap_err();
            assert!(error.contains(why) && error.contains("write HOST, HOST:PORT"), "{entry}: {error}");
        }
    }
}
