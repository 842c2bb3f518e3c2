//! Which processes using the database are alive, so that recovery resolves only the holds of
//! the dead ones.
//!
//! Every process that opens the ledger is an owner with a fresh id, and holds an exclusive lock
//! on the file `ID.lock` in the folder `DATABASE-owners/` for as long as it lives; its holds
//! record that id. The operating system drops the lock when the process ends, however it ends
//! (a SIGKILL included). A hold whose owner's lock can be taken, or whose lock file is gone, was
//! left by a dead process. A new lock file is created and locked under a temporary name, then
//! renamed: nobody can mistake a starting process for a dead one.

use std::fs::{self, File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

const LOCK: &str = "lock";
const STARTING: &str = "new";

/// This process's lock: held while it lives, removed when it is dropped.
#[derive(Debug)]
pub(super) struct Owner {
    id: std::sync::Arc<str>,
    path: PathBuf,
    _lock: File,
}

impl Owner {
    /// Registers a new owner in `dir`, creating the folder if needed.
    pub(super) fn register(dir: &Path) -> io::Result<Owner> {
        fs::create_dir_all(dir)?;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let starting = dir.join(format!("{id}.{STARTING}"));
        let lock = File::create(&starting)?;
        lock.lock()?;
        let path = dir.join(format!("{id}.{LOCK}"));
        fs::rename(&starting, &path)?;
        Ok(Owner { id: id.into(), path, _lock: lock })
    }

    /// This owner's id, recorded with its holds.
    pub(super) fn id(&self) -> &std::sync::Arc<str> {
        &self.id
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        // Removed before the lock is released, so the file never looks abandoned. If removal
        // fails, the next recovery removes it.
        let _ = fs::remove_file(&self.path);
    }
}

/// The owner of some holds, known to be dead: its lock (if its file still exists) is ours
/// until this is dropped, so no other process recovers the same holds meanwhile.
#[derive(Debug)]
pub(super) struct Dead {
    pub(super) id: String,
    lock: Option<(PathBuf, File)>,
}

impl Dead {
    /// Forgets the owner for good, once its holds are resolved.
    pub(super) fn remove(self) {
        if let Some((path, _lock)) = self.lock {
            let _ = fs::remove_file(path);
        }
    }
}

/// Among `owners` (the owners of open holds, `me` excepted) and the lock files in `dir`, the
/// owners whose process has ended.
pub(super) fn dead(dir: &Path, me: &str, owners: &[String]) -> io::Result<Vec<Dead>> {
    let mut dead = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let files = match fs::read_dir(dir) {
        Ok(files) => files.collect::<io::Result<Vec<_>>>()?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    for file in files {
        let path = file.path();
        let (Some(id), Some(extension)) = (path.file_stem().and_then(|s| s.to_str()), path.extension()) else { continue };
        if id == me || (extension != LOCK && extension != STARTING) {
            continue;
        }
        let id = id.to_string();
        if let Some(lock) = try_claim(&path)? {
            seen.insert(id.clone());
            dead.push(Dead { id, lock: Some((path, lock)) });
        } else {
            seen.insert(id);
        }
    }
    for id in owners {
        if id != me && !seen.contains(id) {
            // No lock file at all: its process is gone (or the folder was cleared).
            dead.push(Dead { id: id.clone(), lock: None });
        }
    }
    Ok(dead)
}

/// Takes the lock of the file at `path` if nobody holds it.
fn try_claim(path: &Path) -> io::Result<Option<File>> {
    let file = match File::open(path) {
        Ok(file) => file,
        // Removed meanwhile by its owner or another recovery.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_owner_is_not_dead_and_a_dropped_one_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let alive = Owner::register(dir.path()).unwrap();
        let gone = Owner::register(dir.path()).unwrap();
        let gone_id = gone.id().to_string();
        drop(gone);
        let owners = [alive.id().to_string(), gone_id.clone(), "never-had-a-file".to_string()];
        let dead = dead(dir.path(), "me", &owners).unwrap();
        let mut ids: Vec<_> = dead.iter().map(|d| d.id.clone()).collect();
        ids.sort();
        let mut expected = vec![gone_id, "never-had-a-file".to_string()];
        expected.sort();
        assert_eq!(ids, expected);
    }

    #[test]
    fn an_unlocked_lock_file_is_claimed_once_then_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("crashed.lock"), "").unwrap();
        let first = dead(dir.path(), "me", &[]).unwrap();
        assert_eq!(first.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["crashed"]);
        assert!(dead(dir.path(), "me", &[]).unwrap().is_empty(), "claimed: another recovery leaves it alone");
        first.into_iter().for_each(Dead::remove);
        assert!(!dir.path().join("crashed.lock").exists());
    }
}
