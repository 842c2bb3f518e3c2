//! The operator's settings for this plugin (`[plugins.NAME] config = { ... }` in genpipe.toml),
//! typed. A setting that is present but unusable is an `invalid-input` error that names the
//! key, the value and the type expected; secrets are read like any other setting.

use std::fmt::Display;
use std::str::FromStr;

use crate::{StepError, config};

/// The setting `key` parsed as `T`, or `None` when the operator did not set it.
pub fn get<T>(key: &str) -> Result<Option<T>, StepError>
where
    T: FromStr<Err: Display>,
{
    config::get(key).map(|value| parse(key, &value)).transpose()
}

/// The setting `key` parsed as `T`, or `default` when the operator did not set it.
pub fn get_or<T>(key: &str, default: T) -> Result<T, StepError>
where
    T: FromStr<Err: Display>,
{
    Ok(get(key)?.unwrap_or(default))
}

/// The setting `key` parsed as `T`; an error that asks the operator to set it when missing.
pub fn required<T>(key: &str) -> Result<T, StepError>
where
    T: FromStr<Err: Display>,
{
    get(key)?.ok_or_else(|| {
        StepError::InvalidInput(format!("the setting `{key}` is missing; add it to this plugin's config in genpipe.toml"))
    })
}

fn parse<T>(key: &str, value: &str) -> Result<T, StepError>
where
    T: FromStr<Err: Display>,
{
    value.trim().parse().map_err(|e| {
        StepError::InvalidInput(format!(
            "the setting `{key}` = '{value}' is not a valid {}: {e}",
            std::any::type_name::<T>().rsplit("::").next().unwrap_or("value")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_values_name_the_key_the_value_and_the_type() {
        assert_eq!(parse::<u64>("price", " 12 ").unwrap(), 12);
        let StepError::InvalidInput(message) = parse::<u64>("price", "twelve").unwrap_err() else { panic!("invalid input") };
        assert!(message.contains("`price` = 'twelve' is not a valid u64"), "{message}");
    }
}
