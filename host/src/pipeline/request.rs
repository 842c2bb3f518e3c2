//! Step parameters: the pipeline's `params` for a step, overridden by the run's own, checked and
//! turned into the typed fields of the world's request record.

use std::collections::BTreeMap;

use crate::config::{World, value_to_string};

/// Largest image side a step may ask for.
pub const MAX_IMAGE_SIDE: u32 = 4096;
/// Largest `max_tokens` a step may ask for.
pub const MAX_TOKENS: u32 = 100_000;

/// Checked parameters of one step's request.
#[derive(Debug, Clone, PartialEq)]
pub struct StepParams {
    /// LLM: token limit (default 256).
    pub max_tokens: u32,
    /// LLM: sampling temperature, 0 to 5 (default 1).
    pub temperature: f32,
    /// Seed for the plugin's randomness (default 0).
    pub seed: u64,
    /// Image: width in pixels (default 512).
    pub width: u32,
    /// Image: height in pixels (default 512).
    pub height: u32,
    /// Every other parameter, passed through as strings.
    pub extra: Vec<(String, String)>,
}

impl StepParams {
    /// Checks a step's `params` table from genpipe.toml.
    pub fn from_toml(world: World, params: &BTreeMap<String, toml::Value>) -> Result<StepParams, String> {
        let strings: BTreeMap<String, String> = params.iter().map(|(k, v)| (k.clone(), value_to_string(v))).collect();
        StepParams::from_strings(world, &strings)
    }

    /// Checks parameters given as strings; the error names the parameter, the value and the range.
    pub fn from_strings(world: World, params: &BTreeMap<String, String>) -> Result<StepParams, String> {
        let mut out = StepParams { max_tokens: 256, temperature: 1.0, seed: 0, width: 512, height: 512, extra: Vec::new() };
        for (key, value) in params {
            match (world, key.as_str()) {
                (World::LlmStep, "max_tokens") => out.max_tokens = parse_in(key, value, 1, MAX_TOKENS)?,
                (World::LlmStep, "temperature") => {
                    out.temperature = match value.parse::<f32>() {
                        Ok(t) if (0.0..=5.0).contains(&t) => t,
                        _ => return Err(format!("temperature must be a number from 0 to 5, got '{value}'")),
                    }
                }
                (World::ImageStep, "width") => out.width = parse_in(key, value, 1, MAX_IMAGE_SIDE)?,
                (World::ImageStep, "height") => out.height = parse_in(key, value, 1, MAX_IMAGE_SIDE)?,
                (_, "seed") => out.seed = parse_in(key, value, 0, u64::MAX)?,
                _ => out.extra.push((key.clone(), value.clone())),
            }
        }
        Ok(out)
    }
}

fn parse_in<T: std::str::FromStr + PartialOrd + std::fmt::Display>(key: &str, value: &str, min: T, max: T) -> Result<T, String> {
    match value.parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(format!("{key} must be a whole number from {min} to {max}, got '{value}'")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn typed_fields_are_checked_and_the_rest_passes_through() {
        let p = StepParams::from_strings(World::LlmStep, &strings(&[("max_tokens", "12"), ("style", "terse")])).unwrap();
        assert_eq!((p.max_tokens, p.extra.clone()), (12, vec![("style".into(), "terse".into())]));
        let err = StepParams::from_strings(World::ImageStep, &strings(&[("width", "-3")])).unwrap_err();
        assert_eq!(err, "width must be a whole number from 1 to 4096, got '-3'");
        let err = StepParams::from_strings(World::LlmStep, &strings(&[("temperature", "NaN")])).unwrap_err();
        assert!(err.starts_with("temperature must be a number from 0 to 5"));
    }
}
