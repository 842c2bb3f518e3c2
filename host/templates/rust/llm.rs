//! {{name}}: a genpipe plugin for the `llm-step` world.
//!
//! It answers with the prompt's words in reverse order, charging `credits_per_token` (a setting,
//! default 1) for each word and streaming four words at a time. Replace `generate` with your own.

use genpipe_plugin_sdk::llm::{LlmRequest, LlmResponse};
use genpipe_plugin_sdk::{LlmPlugin, StepError, TokenStream, progress, settings};

struct Plugin;

impl LlmPlugin for Plugin {
    fn generate(request: LlmRequest) -> Result<LlmResponse, StepError> {
        let price = settings::get_or("credits_per_token", 1u64)?;
        let words: Vec<&str> = request.prompt.split_whitespace().rev().take(request.max_tokens as usize).collect();
        if words.is_empty() {
            return Err(StepError::InvalidInput("the prompt is empty; give a few words".into()));
        }
        progress::preparing("reversing the prompt");
        let mut stream = TokenStream::new(price).chunk_tokens(4);
        for (i, word) in words.iter().enumerate() {
            if progress::cancelled() {
                return Err(StepError::Cancelled);
            }
            let token = if i + 1 < words.len() { format!("{word} ") } else { word.to_string() };
            if !stream.push(&token)? {
                break; // the budget ran out: return what was paid for
            }
            progress::generating(i + 1, words.len(), "writing");
        }
        Ok(stream.finish(request.prompt.split_whitespace().count() as u32))
    }
}

genpipe_plugin_sdk::export_llm!(Plugin);
