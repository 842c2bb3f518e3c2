//! The compile cache: a plugin is compiled once, then loaded from disk at every later start,
//! `validate`, `run` and reload.
//!
//! Rules:
//! - a file is named by the SHA-256 of the plugin's wasm and the engine's compatibility hash
//!   (its configuration and wasmtime's version): `DIGEST-ENGINE.cwasm`;
//! - it holds a header (magic, format version, the wasm's digest, the engine hash, the
//!   payload's length and SHA-256) and the component as wasmtime serialized it;
//! - a file is used only when its header names this wasm and this engine and its payload hashes
//!   to the header's checksum. Anything else (truncated, corrupted, another engine's or another
//!   program's file) is never handed to wasmtime: it is logged, counted, and replaced by a
//!   fresh compile;
//! - a file is written under a temporary name and renamed into place, so a reader never sees
//!   half of one; failing to write it costs only a compile at the next start.
//!
//! The cache folder must be as trusted as the genpipe binary: whoever can write a valid file
//! there chooses the native code genpipe runs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::digest::Digest;

const MAGIC: &[u8; 8] = b"GPCWASM\0";
const FORMAT: u32 = 1;
/// Magic, format, wasm digest, engine hash, payload length, payload digest.
const HEADER_LEN: usize = 8 + 4 + 32 + 8 + 8 + 32;

/// How a component was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Compiled, and written to the cache.
    Compiled,
    /// Read from the cache.
    Cached,
    /// Already loaded by this process.
    Reused,
}

/// What the cache did since the runtime started.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Components read from the cache.
    pub hits: AtomicU64,
    /// Components compiled because no file was there (or the cache is off).
    pub misses: AtomicU64,
    /// Files found unusable (truncated, corrupted, foreign) and rebuilt.
    pub rejected: AtomicU64,
}

/// The compile cache of one engine.
#[derive(Debug)]
pub struct CompileCache {
    dir: Option<PathBuf>,
    engine_hash: u64,
    stats: CacheStats,
}

impl CompileCache {
    /// A cache in `dir` (none: always compile) for components of `engine`.
    pub fn new(dir: Option<PathBuf>, engine: &Engine) -> CompileCache {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        CompileCache { dir, engine_hash: hasher.finish(), stats: CacheStats::default() }
    }

    /// What the cache did so far.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// The component of `wasm` (whose SHA-256 is `digest`): from the cache when a sound file is
    /// there, compiled (and cached) otherwise.
    pub fn component(&self, engine: &Engine, digest: &Digest, wasm: &[u8]) -> wasmtime::Result<(Component, Origin)> {
        let Some(dir) = &self.dir else {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return Ok((Component::new(engine, wasm)?, Origin::Compiled));
        };
        let path = dir.join(format!("{}-{:016x}.cwasm", digest.hex(), self.engine_hash));
        match std::fs::read(&path) {
            Ok(file) => match self.payload(&file, digest) {
                Ok(payload) => {
                    // SAFETY: `payload` is byte for byte what `Component::serialize` wrote for
                    // this wasm on an engine with this compatibility hash: the header names both
                    // and the payload's SHA-256 matches the checksum written with it. wasmtime
                    // checks its own header (version, engine settings) again. Only a writer of
                    // the cache folder could forge a matching file, and the folder is trusted as
                    // the binary is (module docs).
                    match unsafe { Component::deserialize(engine, payload) } {
                        Ok(component) => {
                            self.stats.hits.fetch_add(1, Ordering::Relaxed);
                            return Ok((component, Origin::Cached));
                        }
                        Err(e) => self.reject(&path, &format!("wasmtime refused it: {e}")),
                    }
                }
                Err(why) => self.reject(&path, why),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => self.reject(&path, &format!("it cannot be read: {e}")),
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let component = Component::new(engine, wasm)?;
        if let Err(e) = self.write(dir, &path, digest, &component) {
            tracing::warn!(path = %path.display(), "could not write the compile cache (the next start compiles again): {e}");
        }
        Ok((component, Origin::Compiled))
    }

    fn reject(&self, path: &Path, why: &str) {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(path = %path.display(), "ignoring a damaged compile cache file ({why}); compiling again");
    }

    /// The payload of a cache file, if its header names this wasm and engine and its checksum
    /// holds.
    fn payload<'a>(&self, file: &'a [u8], digest: &Digest) -> Result<&'a [u8], &'static str> {
        let header = file.get(..HEADER_LEN).ok_or("it is shorter than its header")?;
        if &header[..8] != MAGIC {
            return Err("it is not a genpipe cache file");
        }
        if header[8..12] != FORMAT.to_le_bytes() {
            return Err("it has another format version");
        }
        if header[12..44] != *digest.bytes() {
            return Err("it was compiled from other wasm");
        }
        if header[44..52] != self.engine_hash.to_le_bytes() {
            return Err("it was compiled by another engine");
        }
        let length = u64::from_le_bytes(header[52..60].try_into().expect("8 bytes"));
        let payload = &file[HEADER_LEN..];
        if payload.len() as u64 != length {
            return Err("it is truncated or has trailing bytes");
        }
        if Sha256::digest(payload).as_slice() != &header[60..92] {
            return Err("its checksum does not match: it is corrupted");
        }
        Ok(payload)
    }

    fn write(&self, dir: &Path, path: &Path, digest: &Digest, component: &Component) -> std::io::Result<()> {
        let payload = component.serialize().map_err(std::io::Error::other)?;
        let mut file = Vec::with_capacity(HEADER_LEN + payload.len());
        file.extend_from_slice(MAGIC);
        file.extend_from_slice(&FORMAT.to_le_bytes());
        file.extend_from_slice(digest.bytes());
        file.extend_from_slice(&self.engine_hash.to_le_bytes());
        file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        file.extend_from_slice(&Sha256::digest(&payload));
        file.extend_from_slice(&payload);
        std::fs::create_dir_all(dir)?;
        let temporary = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&temporary, &file)?;
        std::fs::rename(&temporary, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&temporary);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        Engine::default()
    }

    fn wasm() -> Vec<u8> {
        wat::parse_str("(component (core module (func (export \"f\"))))").unwrap()
    }

    #[test]
    fn a_second_load_comes_from_the_cache_and_a_damaged_file_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine();
        let cache = CompileCache::new(Some(dir.path().to_path_buf()), &engine);
        let wasm = wasm();
        let digest = Digest::of(&wasm);
        assert_eq!(cache.component(&engine, &digest, &wasm).unwrap().1, Origin::Compiled);
        assert_eq!(cache.component(&engine, &digest, &wasm).unwrap().1, Origin::Cached);
        let file = std::fs::read_dir(dir.path()).unwrap().next().unwrap().unwrap().path();
        let sound = std::fs::read(&file).unwrap();

        let damages: [(&str, Vec<u8>); 5] = [
            ("truncated", sound[..sound.len() / 2].to_vec()),
            ("a flipped payload byte", {
                let mut bytes = sound.clone();
                let last = bytes.len() - 1;
                bytes[last] ^= 0xff;
                bytes
            }),
            ("another program's file", b"\x7fELF not ours".to_vec()),
            ("empty", Vec::new()),
            ("another wasm's header", {
                let mut bytes = sound.clone();
                bytes[12] ^= 1;
                bytes
            }),
        ];
        for (rejected, (damage, bytes)) in damages.into_iter().enumerate() {
            std::fs::write(&file, bytes).unwrap();
            let (_, origin) = cache.component(&engine, &digest, &wasm).unwrap();
            assert_eq!(origin, Origin::Compiled, "{damage}: rebuilt, not loaded");
            assert_eq!(cache.stats().rejected.load(Ordering::Relaxed), rejected as u64 + 1, "{damage}");
            assert_eq!(std::fs::read(&file).unwrap(), sound, "{damage}: the file was rewritten");
        }
        assert_eq!(cache.stats().hits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn without_a_folder_every_load_compiles() {
        let engine = engine();
        let cache = CompileCache::new(None, &engine);
        let wasm = wasm();
        let digest = Digest::of(&wasm);
        for _ in 0..2 {
            assert_eq!(cache.component(&engine, &digest, &wasm).unwrap().1, Origin::Compiled);
        }
    }
}
