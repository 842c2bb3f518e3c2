//! API keys: `Authorization: Bearer <key>` maps to an account; the admin key guards the admin
//! routes. Keys are kept only as SHA-256 hashes, whether the config gave them in clear or hashed.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use dashmap::DashMap;
use sha2::{Digest, Sha256};

use super::AppState;
use super::problem::Problem;
use crate::config::Config;

/// Key hashes and the accounts they open: those of the configuration in service (replaced
/// whole by a reload) and those issued by the admin routes (kept across reloads).
#[derive(Debug, Default)]
pub struct Keys {
    configured: ArcSwap<ConfiguredKeys>,
    issued: DashMap<String, String>,
}

/// The keys a configuration declares.
#[derive(Debug, Default)]
struct ConfiguredKeys {
    accounts: HashMap<String, String>,
    admin: Option<String>,
}

/// The SHA-256 of `key`, hex.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl ConfiguredKeys {
    fn from_config(config: &Config) -> ConfiguredKeys {
        let admin = config.server.admin_key.as_deref().map(hash_key).or_else(|| config.server.admin_key_sha256.clone());
        let accounts = config
            .accounts
            .iter()
            .filter_map(|account| {
                let hash = account.api_key.as_deref().map(hash_key).or_else(|| account.api_key_sha256.clone())?;
                Some((hash.to_ascii_lowercase(), account.id.clone()))
            })
            .collect();
        ConfiguredKeys { accounts, admin }
    }
}

impl Keys {
    /// The keys of the configured accounts and the admin key.
    pub fn from_config(config: &Config) -> Keys {
        Keys { configured: ArcSwap::from_pointee(ConfiguredKeys::from_config(config)), issued: DashMap::new() }
    }

    /// Replaces the configured accounts' keys and the admin key with `config`'s; keys issued by
    /// the admin routes stay.
    pub fn reload(&self, config: &Config) {
        self.configured.store(Arc::new(ConfiguredKeys::from_config(config)));
    }

    /// Gives `account` a new key and returns it (the key itself is not kept).
    pub fn issue(&self, account: &str) -> String {
        let key = format!("gp_{}", uuid::Uuid::new_v4().simple());
        self.issued.insert(hash_key(&key), account.to_string());
        key
    }

    /// True when some key opens `account`.
    pub fn has_account(&self, account: &str) -> bool {
        self.configured.load().accounts.values().any(|a| a == account) || self.issued.iter().any(|entry| entry.value() == account)
    }

    fn account(&self, key: &str) -> Option<String> {
        let hash = hash_key(key);
        self.configured.load().accounts.get(&hash).cloned().or_else(|| self.issued.get(&hash).map(|a| a.clone()))
    }

    fn is_admin(&self, key: &str) -> bool {
        self.configured.load().admin.as_deref().is_some_and(|admin| admin.eq_ignore_ascii_case(&hash_key(key)))
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

/// The account of the request's API key; the request takes a token of the account's rate
/// (see [`super::limits`]).
#[derive(Debug, Clone)]
pub struct Caller(pub String);

impl FromRequestParts<AppState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let key = bearer(parts)?;
        let account = state
            .keys
            .account(key)
            .ok_or_else(|| Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "this API key is not known; check it"))?;
        state.limits.take_token(&account)?;
        Ok(Caller(account))
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
