//! A plugin's identity: the SHA-256 of its wasm, written `sha256:HEX` wherever it is shown or
//! pinned.

use std::fmt;

use sha2::{Digest as _, Sha256};

/// The SHA-256 of a plugin's component.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest([u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// Parses `sha256:HEX` (64 hex digits); the error says what is expected.
    pub fn parse(text: &str) -> Result<Digest, String> {
        let hex = text.strip_prefix("sha256:").unwrap_or_default();
        let mut bytes = [0; 32];
        match hex::decode_to_slice(hex, &mut bytes) {
            Ok(()) => Ok(Digest(bytes)),
            Err(_) => Err(format!(
                "'{text}' is not a digest; write \"sha256:\" and the 64 hex digits of the file's SHA-256 \
                 (`sha256sum FILE`, or `genpipe validate` prints it)"
            )),
        }
    }

    /// The 32 bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex digits.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_print_and_parse_as_sha256_hex() {
        let digest = Digest::of(b"abc");
        let text = digest.to_string();
        assert_eq!(text, "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert_eq!(Digest::parse(&text), Ok(digest));
        for bad in ["ba7816bf", "sha256:xyz", "md5:00", "sha256:ba78"] {
            assert!(Digest::parse(bad).unwrap_err().contains("64 hex digits"), "{bad}");
        }
    }
}
