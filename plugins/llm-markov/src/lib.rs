//! An `llm-step` plugin that continues the prompt with a word-level Markov chain (order 2, backing
//! off to order 1) over chapters I–III of *Alice's Adventures in Wonderland* (see `CORPUS.md`).
//!
//! It streams a chunk through `output` every `chunk_tokens` tokens (config, default 8), charges
//! `credits_per_token` (config, default 1; 0 means free) before each token, and reports progress
//! through `status`. When the credits run out it returns the text paid for so far.

mod chain;

use chain::{Chain, Generator, count_words};
use genpipe_plugin_sdk::credits::ChargeError;
use genpipe_plugin_sdk::llm::{Guest, LlmRequest, LlmResponse, TokenUsage};
use genpipe_plugin_sdk::log::{self, Level};
use genpipe_plugin_sdk::status::{self, Stage};
use genpipe_plugin_sdk::{StepError, config, credits, output};
use std::fmt::Display;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::OnceLock;

const CORPUS: &str = include_str!("../corpus.txt");

/// Reads the number at config `key`, or `default` when it is not set.
fn config_number<T: FromStr<Err: Display>>(key: &str, default: T) -> Result<T, StepError> {
    config::get(key).map_or(Ok(default), |value| {
        value.trim().parse().map_err(|e| StepError::InvalidInput(format!("config `{key}` = '{value}' is not usable: {e}")))
    })
}

struct MarkovLlm;

impl Guest for MarkovLlm {
    fn generate(request: LlmRequest) -> Result<LlmResponse, StepError> {
        status::report(Stage::Preparing, 0.0, "building the Markov chain");
        let price: u64 = config_number("credits_per_token", 1)?;
        let chunk_tokens = config_number("chunk_tokens", NonZeroU32::new(8).unwrap())?.get();
        static CHAIN: OnceLock<Chain> = OnceLock::new();
        let chain = CHAIN.get_or_init(|| Chain::build(CORPUS));
        let mut generator = Generator::new(chain, &request.prompt, request.seed, request.temperature);

        let max_tokens = request.max_tokens;
        let (mut text, mut chunk, mut tokens) = (String::new(), String::new(), 0);
        let mut flush = |chunk: &mut String, tokens: u32| {
            output::emit(chunk);
            text.push_str(chunk);
            chunk.clear();
            let message = format!("generated {tokens} of {max_tokens} tokens");
            status::report(Stage::Generating, tokens as f32 / max_tokens as f32, &message);
        };
        let mut out_of_credits = None;
        while tokens < max_tokens {
            if tokens.is_multiple_of(chunk_tokens) && status::cancelled() {
                return Err(StepError::Cancelled);
            }
            if price > 0 {
                match credits::charge(price, "token") {
                    Ok(_) => {}
                    Err(ChargeError::Insufficient(left)) => {
                        out_of_credits = Some(left);
                        break;
                    }
                    Err(ChargeError::RunEnded) => return Err(StepError::Cancelled),
                    Err(ChargeError::InvalidAmount) => {
                        return Err(StepError::Internal(format!("the host refused a charge of {price}")));
                    }
                }
            }
            chunk.push_str(&generator.next_piece());
            tokens += 1;
            if tokens.is_multiple_of(chunk_tokens) {
                flush(&mut chunk, tokens);
            }
        }
        if !chunk.is_empty() {
            flush(&mut chunk, tokens);
        }
        if let Some(left) = out_of_credits {
            let message = format!("a token costs {price} credit(s) but only {left} remain");
            if tokens == 0 {
                return Err(StepError::OutOfCredits(message));
            }
            log::log(Level::Warn, &format!("stopped after {tokens} of {max_tokens} tokens: {message}"));
        }
        status::report(Stage::Finishing, 1.0, &format!("generated {tokens} tokens"));
        let usage = TokenUsage { prompt_tokens: count_words(&request.prompt) as u32, completion_tokens: tokens };
        Ok(LlmResponse { text, usage })
    }
}

genpipe_plugin_sdk::llm::export!(MarkovLlm);
