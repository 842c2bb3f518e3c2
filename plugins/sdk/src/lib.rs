//! Guest bindings for writing genpipe plugins in Rust.
//!
//! A plugin crate is a `cdylib` built for `wasm32-wasip2`. It implements the `Guest` trait of
//! its world and exports it with the matching macro:
//!
//! ```ignore
//! use genpipe_plugin_sdk::llm::{Guest, LlmRequest, LlmResponse, StepError, TokenUsage};
//!
//! struct Echo;
//! impl Guest for Echo {
//!     fn generate(request: LlmRequest) -> Result<LlmResponse, StepError> {
//!         let usage = TokenUsage { prompt_tokens: 0, completion_tokens: 0 };
//!         Ok(LlmResponse { text: request.prompt, usage })
//!     }
//! }
//! genpipe_plugin_sdk::llm::export!(Echo);
//! ```
//!
//! The host interfaces (`status`, `credits`, `output`, `log`, `config`) are re-exported at the
//! crate root; they act on the calling step only. [`http`] sends requests to the hosts the
//! operator allowed.

/// Bindings for the `llm-step` world: prompt in, text out.
pub mod llm {
    wit_bindgen::generate!({
        world: "llm-step",
        path: "../../wit",
        pub_export_macro: true,
        default_bindings_module: "genpipe_plugin_sdk::llm",
        generate_all,
    });
}

/// Bindings for the `image-step` world: prompt in, encoded image out.
pub mod image {
    wit_bindgen::generate!({
        world: "image-step",
        path: "../../wit",
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

pub use llm::genpipe::plugin::types::StepError;
pub use llm::genpipe::plugin::{config, credits, log, output, status};

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
