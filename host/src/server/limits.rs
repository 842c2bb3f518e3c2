//! What one account may take of the service: its request rate and its open event streams.
//!
//! Rules:
//! - every request made with an account's key takes a token from that account's bucket
//!   (`rate_limit_burst` tokens, refilled at `rate_limit_per_sec`, GCRA from `governor`); an
//!   empty bucket answers 429 with `Retry-After`, the seconds until a token is back. Requests
//!   without a key (health, metrics, the document) and admin requests take no token, and one
//!   account's bucket never touches another's;
//! - an event stream holds a slot of its run and one of its account from the moment it is
//!   admitted until its connection is gone; beyond `max_streams_per_run` or
//!   `max_streams_per_account`, a new stream gets 429;
//! - the maps are keyed by authenticated accounts and their runs only, so a stranger cannot grow
//!   them; buckets idle long enough to be full again are swept.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::http::StatusCode;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::problem::Problem;
use crate::config::ServerConfig;

/// How long a client refused a stream slot should wait before trying again, in seconds.
const STREAM_RETRY_SECS: u64 = 5;

/// The per-account limits of a running service.
pub struct Limits {
    rate: DefaultKeyedRateLimiter<String>,
    clock: DefaultClock,
    limited: AtomicU64,
    streams: Arc<Streams>,
}

impl Limits {
    /// Limits as `config` sets them.
    pub fn new(config: &ServerConfig) -> Limits {
        let per_sec = NonZeroU32::new(config.rate_limit_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(NonZeroU32::MIN);
        Limits {
            rate: RateLimiter::dashmap(Quota::per_second(per_sec).allow_burst(burst)),
            clock: DefaultClock::default(),
            limited: AtomicU64::new(0),
            streams: Arc::new(Streams {
                max_per_run: config.max_streams_per_run,
                max_per_account: config.max_streams_per_account,
                open: Mutex::default(),
            }),
        }
    }

    /// Takes a token of `account`'s bucket, or answers 429 with the seconds until one is back.
    pub fn take_token(&self, account: &str) -> Result<(), Problem> {
        let key = account.to_string();
        self.rate.check_key(&key).map_err(|not_until| {
            self.limited.fetch_add(1, Ordering::Relaxed);
            let wait = not_until.wait_time_from(self.clock.now());
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                format!(
                    "account '{account}' is over its request rate; retry after {} s, and spread requests out \
                     (ask the operator to raise [server] rate_limit_per_sec if you need more)",
                    seconds.max(1)
                ),
            )
            .retry_after(seconds.max(1))
        })
    }

    /// A slot for an event stream of `run`, for `account`, or 429 when either is at its cap.
    pub fn open_stream(&self, account: &str, run: &str) -> Result<StreamSlot, Problem> {
        let streams = &self.streams;
        let mut open = streams.open.lock().unwrap_or_else(PoisonError::into_inner);
        let of_run = open.by_run.get(run).copied().unwrap_or(0);
        let of_account = open.by_account.get(account).copied().unwrap_or(0);
        let refusal = if of_run >= streams.max_per_run {
            Some(format!(
                "run '{run}' already has {of_run} event streams open, the most [server] max_streams_per_run allows; \
                 share one stream, or close one first"
            ))
        } else if of_account >= streams.max_per_account {
            Some(format!(
                "account '{account}' already has {of_account} event streams open, the most [server] \
                 max_streams_per_account allows; close some first"
            ))
        } else {
            None
        };
        if let Some(detail) = refusal {
            self.limited.fetch_add(1, Ordering::Relaxed);
            return Err(Problem::new(StatusCode::TOO_MANY_REQUESTS, "too-many-streams", detail).retry_after(STREAM_RETRY_SECS));
        }
        *open.by_run.entry(run.to_string()).or_default() += 1;
        *open.by_account.entry(account.to_string()).or_default() += 1;
        open.total += 1;
        Ok(StreamSlot { streams: Arc::clone(streams), run: run.to_string(), account: account.to_string() })
    }

    /// Event streams open now.
    pub fn streams_open(&self) -> usize {
        self.streams.open.lock().unwrap_or_else(PoisonError::into_inner).total
    }

    /// Requests refused so far for a rate or a stream cap.
    pub fn limited_total(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }

    /// Forgets the buckets that are full again (an account that comes back starts full anyway).
    pub fn sweep(&self) {
        self.rate.retain_recent();
        self.rate.shrink_to_fit();
    }
}

/// Open event streams by run and by account.
struct Streams {
    max_per_run: usize,
    max_per_account: usize,
    open: Mutex<OpenStreams>,
}

#[derive(Default)]
struct OpenStreams {
    by_run: HashMap<String, usize>,
    by_account: HashMap<String, usize>,
    total: usize,
}

/// One open event stream's place in the counts, given back when dropped.
pub struct StreamSlot {
    streams: Arc<Streams>,
    run: String,
    account: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut guard = self.streams.open.lock().unwrap_or_else(PoisonError::into_inner);
        let open = &mut *guard;
        for (map, key) in [(&mut open.by_run, &self.run), (&mut open.by_account, &self.account)] {
            if let Some(count) = map.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    map.remove(key);
                }
            }
        }
        open.total -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_sec: u32, burst: u32, per_run: usize, per_account: usize) -> Limits {
        Limits::new(&ServerConfig {
            rate_limit_per_sec: per_sec,
            rate_limit_burst: burst,
            max_streams_per_run: per_run,
            max_streams_per_account: per_account,
            ..ServerConfig::default()
        })
    }

    #[test]
    fn an_empty_bucket_refuses_with_the_wait_and_leaves_other_accounts_alone() {
        let limits = limits(1, 3, 1, 1);
        for _ in 0..3 {
            limits.take_token("acme").unwrap();
        }
        let refused = limits.take_token("acme").unwrap_err();
        assert_eq!((refused.status, refused.retry_after), (429, Some(1)));
        assert!(refused.detail.contains("over its request rate"), "{}", refused.detail);
        limits.take_token("globex").unwrap();
        assert_eq!(limits.limited_total(), 1);
    }

    #[test]
    fn stream_slots_are_capped_per_run_and_per_account_and_given_back() {
        let limits = limits(1, 1, 2, 3);
        let a = limits.open_stream("acme", "r1").unwrap();
        let _b = limits.open_stream("acme", "r1").unwrap();
        let refused = limits.open_stream("acme", "r1").err().unwrap();
        assert!(refused.detail.contains("max_streams_per_run"), "{}", refused.detail);
        let _c = limits.open_stream("acme", "r2").unwrap();
        let refused = limits.open_stream("acme", "r3").err().unwrap();
        assert!(refused.detail.contains("max_streams_per_account"), "{}", refused.detail);
        let _other = limits.open_stream("globex", "r3").unwrap();
        assert_eq!(limits.streams_open(), 4);
        drop(a);
        assert_eq!(limits.streams_open(), 3);
        limits.open_stream("acme", "r1").unwrap();
    }
}
