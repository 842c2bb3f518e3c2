//! The Rust SDK for genpipe plugins.
//!
//! A plugin crate is a `cdylib` built for `wasm32-wasip2` (`cargo build --release --target
//! wasm32-wasip2`). It implements the trait of its world, [`LlmPlugin`] or [`ImagePlugin`], and
//! exports it with [`export_llm!`] or [`export_image!`]:
//!
//! ```ignore
//! use genpipe_plugin_sdk::llm::{LlmRequest, LlmResponse};
//! use genpipe_plugin_sdk::{LlmPlugin, StepError, TokenStream, progress, settings};
//!
//! /// Repeats the prompt's words, a credit a word, streaming four words at a time.
//! struct Parrot;
//!
//! impl LlmPlugin for Parrot {
//!     fn generate(request: LlmRequest) -> Result<LlmResponse, StepError> {
//!         let price = settings::get_or("credits_per_token", 1u64)?;
//!         let mut stream = TokenStream::new(price).chunk_tokens(4);
//!         let words: Vec<&str> = request.prompt.split_inclusive(' ').take(request.max_tokens as usize).collect();
//!         for (i, word) in words.iter().enumerate() {
//!             if !stream.push(word)? {
//!                 break; // the budget ran out: return what was paid for
//!             }
//!             progress::generating(i + 1, words.len(), "repeating");
//!         }
//!         Ok(stream.finish(0))
//!     }
//! }
//!
//! genpipe_plugin_sdk::export_llm!(Parrot);
//! ```
//!
//! What a plugin can reach, all scoped by the host to the calling step (no function names a
//! run, a step or an account):
//! - [`status`], [`progress`]: report the stage and progress; ask whether the run was cancelled;
//! - [`credits`], [`TokenStream`]: charge against the step's budget (`max_cost`), atomically and
//!   never beyond it;
//! - [`output`], [`TokenStream`]: stream text to the run's subscribers;
//! - [`log`]: write to the host's log (up to the operator's `max_log_bytes`);
//! - [`config`], [`settings`]: read the operator's settings for this plugin, typed;
//! - [`http`]: send HTTP requests to the hosts the operator allowed.
//!
//! Errors are [`StepError`]; the usual failures convert into it with `?` (an HTTP failure is
//! `upstream`, a refused charge `out-of-credits` or `cancelled`, an unusable setting
//! `invalid-input`).

/// Bindings for the `llm-step` world: prompt in, text out.
pub mod llm {
    wit_bindgen::generate!({
        world: "llm-step",
        path: "../../wit/0.1.0",
        pub_export_macro: true,
        default_bindings_module: "genpipe_plugin_sdk::llm",
        generate_all,
    });
}

/// Bindings for the `image-step` world: prompt in, encoded image out.
pub mod image {
    wit_bindgen::generate!({
        world: "image-step",
        path: "../../wit/0.1.0",
        pub_export_macro: true,
        default_bindings_module: "genpipe_plugin_sdk::image",
        with: {
            "genpipe:plugin/types@0.1.0": crate::llm::genpipe::plugin::types,
            "genpipe:plugin/status@0.1.0": crate::llm::genpipe::plugin::status,
            "genpipe:plugin/credits@0.1.0": crate::llm::genpipe::plugin::credits,
            "genpipe:plugin/log@0.1.0": crate::llm::genpipe::plugin::log,
            "genpipe:plugin/config@0.1.0": crate::llm::genpipe::plugin::config,
            "wasi:http/types@0.2.12": crate::llm::wasi::http::types,
            "wasi:http/outgoing-handler@0.2.12": crate::llm::wasi::http::outgoing_handler,
            "wasi:io/poll@0.2.12": crate::llm::wasi::io::poll,
            "wasi:io/streams@0.2.12": crate::llm::wasi::io::streams,
            "wasi:io/error@0.2.12": crate::llm::wasi::io::error,
            "wasi:clocks/monotonic-clock@0.2.12": crate::llm::wasi::clocks::monotonic_clock,
        },
    });
}

pub mod http;
pub mod progress;
pub mod settings;
mod stream;
mod worlds;

pub use llm::genpipe::plugin::types::StepError;
pub use llm::genpipe::plugin::{config, credits, log, output, status};
pub use stream::TokenStream;
pub use worlds::{ImagePlugin, LlmPlugin};

/// Looks up `key` in a request's free-form parameters.
pub fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// A small deterministic random number generator (SplitMix64), enough for sampling in plugins
/// without pulling in a crate.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// Seeds the generator.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform float in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A stable 64-bit hash (FNV-1a) of text, for deriving seeds and pictures from prompts.
pub fn hash_text(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}
