//! The host interfaces of `wit/`, one file each, implemented on a step's [`StepState`], and
//! outbound HTTP (`wasi:http`) through the plugin's allowlist.
//!
//! Every function acts on the calling step only: identity (run, step, account, hold) comes from
//! the store, never from an argument.
//!
//! [`StepState`]: crate::runtime::StepState

mod config;
mod credits;
pub(crate) mod http;
mod log;
mod output;
mod status;
mod v0_2;

/// Longest status message or log line kept, in bytes; longer ones are cut at a char boundary.
const MAX_MESSAGE_BYTES: usize = 1024;

/// Cuts `text` to at most [`MAX_MESSAGE_BYTES`] on a char boundary.
fn truncate(mut text: String) -> String {
    if text.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

impl crate::runtime::bindings::types::Host for crate::runtime::StepState {}
