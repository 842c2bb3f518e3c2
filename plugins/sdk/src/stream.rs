//! Streaming text with per-token charging.
//!
//! Each token is paid for before it is kept: [`TokenStream::push`] charges its price, and when
//! the step's budget cannot cover it, the token is dropped and `push` says so, so the plugin can
//! stop and return what was paid for. Kept tokens are streamed to the run's subscribers every
//! `chunk_tokens` tokens, and the rest when the stream finishes.

use crate::credits::{self, ChargeError};
use crate::llm::{LlmResponse, TokenUsage};
use crate::{StepError, output};

/// Text being generated, paid for and streamed token by token.
#[derive(Debug)]
pub struct TokenStream {
    price: u64,
    chunk_tokens: u32,
    text: String,
    /// Where the part not yet streamed starts.
    streamed: usize,
    pending_tokens: u32,
    tokens: u32,
    exhausted: bool,
}

impl TokenStream {
    /// A stream charging `price` credits a token (0: free), streaming every 8 tokens.
    pub fn new(price: u64) -> TokenStream {
        TokenStream { price, chunk_tokens: 8, text: String::new(), streamed: 0, pending_tokens: 0, tokens: 0, exhausted: false }
    }

    /// Streams every `tokens` tokens instead (at least 1).
    pub fn chunk_tokens(mut self, tokens: u32) -> TokenStream {
        self.chunk_tokens = tokens.max(1);
        self
    }

    /// Pays for `token` and keeps it. `Ok(false)` when the budget cannot cover it (the token is
    /// not kept, and no later one will be); an error when the run was cancelled.
    pub fn push(&mut self, token: &str) -> Result<bool, StepError> {
        if self.exhausted {
            return Ok(false);
        }
        if self.price > 0 {
            match credits::charge(self.price, "token") {
                Ok(_) => {}
                Err(ChargeError::Insufficient(_)) => {
                    self.exhausted = true;
                    return Ok(false);
                }
                Err(error) => return Err(error.into()),
            }
        }
        self.text.push_str(token);
        self.tokens += 1;
        self.pending_tokens += 1;
        if self.pending_tokens >= self.chunk_tokens {
            self.flush();
        }
        Ok(true)
    }

    /// Whether the budget ran out.
    pub fn is_exhausted(&self) -> bool {
        self.exhausted
    }

    /// Tokens kept so far.
    pub fn tokens(&self) -> u32 {
        self.tokens
    }

    /// Streams what is not streamed yet.
    pub fn flush(&mut self) {
        if self.streamed < self.text.len() {
            output::emit(&self.text[self.streamed..]);
            self.streamed = self.text.len();
        }
        self.pending_tokens = 0;
    }

    /// Streams the rest and returns the response: the whole text, with `prompt_tokens` and the
    /// tokens kept as its usage.
    pub fn finish(mut self, prompt_tokens: u32) -> LlmResponse {
        self.flush();
        LlmResponse { text: self.text, usage: TokenUsage { prompt_tokens, completion_tokens: self.tokens } }
    }
}

impl From<ChargeError> for StepError {
    fn from(error: ChargeError) -> StepError {
        match error {
            ChargeError::Insufficient(remaining) => {
                StepError::OutOfCredits(format!("the step's budget has {remaining} credits left, not enough for this charge"))
            }
            ChargeError::InvalidAmount => StepError::Internal("a charge of zero credits was refused".into()),
            ChargeError::RunEnded => StepError::Cancelled,
        }
    }
}
