//! `config`: the step reads its plugin's settings from genpipe.toml.

use crate::runtime::StepState;
use crate::runtime::bindings::config::Host;

impl Host for StepState {
    fn get(&mut self, key: String) -> Option<String> {
        self.plugin.config.get(&key).cloned()
    }

    fn all(&mut self) -> Vec<(String, String)> {
        self.plugin.config.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}
