#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| genpipe_fuzz::plugin(data));
