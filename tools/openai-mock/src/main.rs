//! `openai-mock`: the local OpenAI-compatible server as a process, for the demo and for trying
//! plugins by hand. Its first line on stdout is `openai-mock listening on http://ADDR`.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use openai_mock::{Options, Stats};

/// A local OpenAI-compatible server: chat completions and image generations, with failure modes
/// chosen by the model name (see the crate documentation).
#[derive(Debug, Parser)]
#[command(name = "openai-mock")]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8787")]
    listen: String,
    /// Require `Authorization: Bearer KEY` on every request (401 otherwise).
    #[arg(long)]
    api_key: Option<String>,
    /// Pause before each streamed token, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms_per_token: u64,
    /// How long the `slow-first-byte` model waits before answering, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    first_byte_delay_ms: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let listener = match tokio::net::TcpListener::bind(&args.listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("openai-mock: cannot listen on {}: {e}; pick a free address with --listen", args.listen);
            return ExitCode::from(2);
        }
    };
    let address = listener.local_addr().expect("a bound listener has an address");
    println!("openai-mock listening on http://{address}");
    let _ = std::io::stdout().flush();
    let options = Options {
        api_key: args.api_key,
        delay_per_token: Duration::from_millis(args.delay_ms_per_token),
        first_byte_delay: Duration::from_millis(args.first_byte_delay_ms),
    };
    match openai_mock::serve(listener, options, Arc::new(Stats::default())).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("openai-mock: the server failed: {e}");
            ExitCode::FAILURE
        }
    }
}
