//! A test plugin for the `llm-step` world. Its params choose what it does, in this order:
//!
//! 1. `log`: writes it to the host's log at info level, and `delay_ms`: sleeps that long
//!    (through WASI clocks);
//! 2. `amount`: charges that many credits in one call (an out-of-credits error if refused);
//! 3. `behaviour`:
//!    - `echo` (default): returns the prompt (with no other param, it touches no host function:
//!      the no-op plugin of the benchmarks);
//!    - `chunks`: emits the prompt word by word through `output`, charging 1 credit a word;
//!    - `fail`: returns `step-error::internal`;
//!    - `trap`: panics, which traps the instance;
//!    - `oom`: allocates memory until the host refuses to grow it;
//!    - `wait-cancel`: polls `status.cancelled()` until the run is cancelled, then returns
//!      `step-error::cancelled`;
//!    - `spin`: loops forever, ignoring cancellation, until the host stops it;
//!    - `version`: returns [`VERSION`], which tests patch in a copy of the component to make a
//!      second version of this plugin.

use genpipe_plugin_sdk::llm::{Guest, LlmRequest, LlmResponse, TokenUsage};
use genpipe_plugin_sdk::{StepError, credits, log, output, param, status};

/// What `behaviour = "version"` returns.
pub const VERSION: &str = "test-llm version A";

struct TestLlm;

fn charge(amount: u64, reason: &str) -> Result<(), StepError> {
    credits::charge(amount, reason).map(drop).map_err(|e| StepError::OutOfCredits(format!("{e:?}")))
}

impl Guest for TestLlm {
    fn generate(request: LlmRequest) -> Result<LlmResponse, StepError> {
        let number = |key: &str| param(&request.params, key).and_then(|v| v.parse::<u64>().ok());
        if let Some(message) = param(&request.params, "log") {
            log::log(log::Level::Info, message);
        }
        if let Some(ms) = number("delay_ms") {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        if let Some(amount) = number("amount") {
            charge(amount, "test charge")?;
        }
        match param(&request.params, "behaviour").unwrap_or("echo") {
            "echo" => {}
            "chunks" => {
                for word in request.prompt.split_inclusive(' ') {
                    charge(1, "word")?;
                    output::emit(word);
                }
            }
            "fail" => return Err(StepError::Internal("test-llm failed on purpose".into())),
            "trap" => panic!("test-llm trapped on purpose"),
            "oom" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(std::hint::black_box(vec![1u8; 1 << 20]));
                }
            }
            "wait-cancel" => {
                while !status::cancelled() {
                    std::hint::spin_loop();
                }
                return Err(StepError::Cancelled);
            }
            "version" => {
                return Ok(LlmResponse { text: VERSION.into(), usage: TokenUsage { prompt_tokens: 0, completion_tokens: 0 } });
            }
            "spin" => {
                let mut x = 0u64;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            other => return Err(StepError::InvalidInput(format!("unknown behaviour '{other}'"))),
        }
        let words = request.prompt.split_whitespace().count() as u32;
        let usage = TokenUsage { prompt_tokens: words, completion_tokens: words };
        Ok(LlmResponse { text: request.prompt, usage })
    }
}

genpipe_plugin_sdk::llm::export!(TestLlm);
