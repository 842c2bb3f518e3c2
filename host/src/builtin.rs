//! Plugins bundled into the binary (built from `plugins/` by the build script), named in
//! genpipe.toml as `path = "builtin:NAME"`.

include!(concat!(env!("OUT_DIR"), "/bundled_plugins.rs"));

/// The component bytes of bundled plugin `name`.
pub fn plugin(name: &str) -> Option<&'static [u8]> {
    BUNDLED.iter().find(|(n, _)| *n == name).map(|(_, bytes)| *bytes)
}

/// Names of the bundled plugins.
pub fn names() -> Vec<&'static str> {
    BUNDLED.iter().map(|(name, _)| *name).collect()
}
