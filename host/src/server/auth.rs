//! API keys: `Authorization: Bearer <key>` maps to an account; the admin key guards the admin
//! routes. Keys are kept only as SHA-256 hashes, whether the config gave them in clear or hashed.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use dashmap::DashMap;
use sha2::{Digest, Sha256};

use super::AppState;
use super::problem::Problem;
use crate::config::Config;

/// Key hashes and the accounts they open.
#[derive(Debug, Default)]
pub struct Keys {
    accounts: DashMap<String, String>,
    admin: Option<String>,
}

/// The SHA-256 of `key`, hex.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Keys {
    /// The keys of the configured accounts and the admin key.
    pub fn from_config(config: &Config) -> Keys {
        let keys = Keys {
            accounts: DashMap::new(),
            admin: config.server.admin_key.as_deref().map(hash_key).or_else(|| config.server.admin_key_sha256.clone()),
        };
        for account in &config.accounts {
            let hash = account.api_key.as_deref().map(hash_key).or_else(|| account.api_key_sha256.clone());
            if let Some(hash) = hash {
                keys.accounts.insert(hash.to_ascii_lowercase(), account.id.clone());
            }
        }
        keys
    }

    /// Gives `account` a new key and returns it (the key itself is not kept).
    pub fn issue(&self, account: &str) -> String {
        let key = format!("gp_{}", uuid::Uuid::new_v4().simple());
        self.accounts.insert(hash_key(&key), account.to_string());
        key
    }

    /// True when some key opens `account`.
    pub fn has_account(&self, account: &str) -> bool {
        self.accounts.iter().any(|entry| entry.value() == account)
    }

    fn account(&self, key: &str) -> Option<String> {
        self.accounts.get(&hash_key(key)).map(|a| a.clone())
    }

    fn is_admin(&self, key: &str) -> bool {
        self.admin.as_deref().is_some_and(|admin| admin.eq_ignore_ascii_case(&hash_key(key)))
    }
}

fn bearer(parts: &Parts) -> Result<&str, Problem> {
    let unauthorized = |detail: &str| Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", detail);
    let value = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("no Authorization header; send `Authorization: Bearer <your API key>`"))?;
    let value = value.to_str().map_err(|_| unauthorized("the Authorization header is not readable text"))?;
    match value.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("bearer") && !key.trim().is_empty() => Ok(key.trim()),
        _ => Err(unauthorized("the Authorization header must be `Bearer <your API key>`")),
    }
}

/// The account of the request's API key.
#[derive(Debug, Clone)]
pub struct Caller(pub String);

impl FromRequestParts<AppState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let key = bearer(parts)?;
        state
            .keys
            .account(key)
            .map(Caller)
            .ok_or_else(|| Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "this API key is not known; check it"))
    }
}

/// A request made with the admin key.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        if state.keys.is_admin(bearer(parts)?) {
            Ok(Admin)
        } else {
            Err(Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "this route needs the admin key"))
        }
    }
}
