//! The server's address: parsing `[ledger] url`, the password from the environment, and the URL
//! as errors and logs show it, without a password.

use std::str::FromStr;

/// The connection settings of `url`, with `password` (from the environment) added. A password
/// in the URL itself is refused: the configuration file is no place for it.
pub(super) fn pg_config(url: &str, password: Option<&str>) -> Result<tokio_postgres::Config, String> {
    let mut config = tokio_postgres::Config::from_str(url).map_err(|e| {
        format!("is not a PostgreSQL URL ({e}); write it as postgres://USER@HOST:PORT/DATABASE or postgres:///DATABASE?host=/SOCKET/DIR")
    })?;
    if config.get_password().is_some() {
        return Err("holds a password; remove it from the URL and set it in the environment (PGPASSWORD, or the \
                    variable that [ledger] password_env names)"
            .into());
    }
    if let Some(password) = password {
        config.password(password);
    }
    if config.get_application_name().is_none() {
        config.application_name("genpipe");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    Ok(config)
}

/// `url` with any password replaced by `***`: the only form in which errors and logs show it.
pub(crate) fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find(['/', '?']).unwrap_or(rest.len());
            let (authority, path) = rest.split_at(end);
            let authority = match authority.rsplit_once('@') {
                Some((userinfo, host)) if userinfo.contains(':') => {
                    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                    format!("{user}:***@{host}")
                }
                _ => authority.to_string(),
            };
            let path = match path.split_once('?') {
                Some((path, query)) => {
                    let params: Vec<String> = query
                        .split('&')
                        .map(|param| match param.split_once('=') {
                            Some((key, _)) if key == "password" => format!("{key}=***"),
                            _ => param.to_string(),
                        })
                        .collect();
                    format!("{path}?{}", params.join("&"))
                }
                None => path.to_string(),
            };
            format!("{scheme}://{authority}{path}")
        }
        None => redact_key_values(url),
    }
}

/// The `key=value key='quoted value'` form, with the value of `password` replaced.
fn redact_key_values(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("password") {
        let (before, after) = rest.split_at(start);
        out.push_str(before);
        let after_key = after["password".len()..].trim_start();
        let is_key = before.chars().next_back().is_none_or(char::is_whitespace);
        let Some(value) = after_key.strip_prefix('=').filter(|_| is_key) else {
            out.push_str("password");
            rest = &after["password".len()..];
            continue;
        };
        out.push_str("password=***");
        let value = value.trim_start();
        rest = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            let end = quoted
                .char_indices()
                .find(|&(_, c)| {
                    let closes = c == '\'' && !escaped;
                    escaped = c == '\\' && !escaped;
                    closes
                })
                .map_or(quoted.len(), |(i, _)| i + 1);
            &quoted[end..]
        } else {
            &value[value.find(char::is_whitespace).unwrap_or(value.len())..]
        };
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        for (url, shown) in [
            ("postgres://genpipe@127.0.0.1:5432/genpipe", "postgres://genpipe@127.0.0.1:5432/genpipe"),
            ("postgres://genpipe:s3cret@db:5432/genpipe", "postgres://genpipe:***@db:5432/genpipe"),
            ("postgresql://u:p@ss@h/d?sslmode=disable", "postgresql://u:***@h/d?sslmode=disable"),
            ("postgres:///genpipe?host=/tmp/pg&password=s3cret&user=x", "postgres:///genpipe?host=/tmp/pg&password=***&user=x"),
            ("host=/tmp/pg password=s3cret user=x", "host=/tmp/pg password=*** user=x"),
            ("host=h password = 'a \\' b' dbname=d", "host=h password=*** dbname=d"),
            ("user=password_keeper dbname=d", "user=password_keeper dbname=d"),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[test]
    fn the_password_comes_from_the_environment_only() {
        let config = pg_config("postgres://genpipe@127.0.0.1:5432/genpipe", Some("from-env")).unwrap();
        assert_eq!(config.get_password(), Some(&b"from-env"[..]));
        assert_eq!(config.get_application_name(), Some("genpipe"));
        let error = pg_config("postgres://genpipe:s3cret@127.0.0.1/genpipe", None).unwrap_err();
        assert!(error.contains("holds a password") && !error.contains("s3cret"), "{error}");
        assert!(
            pg_config("postgres://genpipe@127.0.0.1:notaport/genpipe", None).unwrap_err().contains("is not a PostgreSQL URL")
        );
    }
}
