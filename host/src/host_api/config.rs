//! `config`: the step reads its plugin's settings from genpipe.toml, secrets included: a secret
//! is readable by its own plugin only, through this interface.

use crate::runtime::StepState;
use crate::runtime::bindings::config::Host;

impl Host for StepState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.plugin().config.get(&key).map(|setting| setting.value.clone()))
    }

    fn all(&mut self) -> wasmtime::Result<Vec<(String, String)>> {
        Ok(self.plugin().config.iter().map(|(k, setting)| (k.clone(), setting.value.clone())).collect())
    }
}
