//! A test plugin for the `llm-step` world of `genpipe:plugin@0.2.0`, built with wit-bindgen
//! directly (the SDK targets 0.1.0). It logs the prompt with 0.2.0's `log.log-fields`, charges
//! one credit, and answers `v2: PROMPT`.

wit_bindgen::generate!({
    world: "llm-step",
    path: "../../wit/0.2.0",
    generate_all,
});

use genpipe::plugin::{credits, log};

struct TestV2;

impl Guest for TestV2 {
    fn generate(request: LlmRequest) -> Result<LlmResponse, StepError> {
        log::log_fields(
            log::Level::Info,
            "generating",
            &[("contract".into(), "0.2.0".into()), ("prompt".into(), request.prompt.clone())],
        );
        credits::charge(1, "answer").map_err(|e| StepError::OutOfCredits(format!("{e:?}")))?;
        Ok(LlmResponse { text: format!("v2: {}", request.prompt), usage: TokenUsage { prompt_tokens: 0, completion_tokens: 0 } })
    }
}

export!(TestV2);
