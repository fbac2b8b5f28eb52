//! Whether the precompiled-plugin cache (`plugins.cache_dir`) may be read at all.
//!
//! A cache file is native code: wasmtime's `Component::deserialize` runs what it holds
//! without checking it (its safety contract is "bytes this engine serialized"). Whoever can
//! write a file the engine deserializes runs code as the engine, with its database and
//! Kafka credentials. So the cache is trusted only when no one but the engine's own user (and
//! root) can have put anything there:
//!
//! - the directory is the engine user's, and neither group- nor world-writable;
//! - each directory above it belongs to the engine's user or to root and is not writable by
//!   others, unless sticky (as `/tmp`: others cannot rename or replace what is not theirs);
//! - each file read is a regular file of the engine's user, not group- or world-writable
//!   (checked on the opened file, so it cannot be swapped between check and read).
//!
//! At start-up a cache directory that fails these checks stops the engine (the operator asked
//! for a cache; a silent fallback would hide a hole). Should it turn unsafe later, a load
//! does not read it (and does not write it), compiles from the plugin file, and says why in a
//! warning.

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// Group- or world-writable.
const WRITABLE_BY_OTHERS: u32 = 0o022;
/// The sticky bit: in such a directory only an entry's owner may rename or delete it.
const STICKY: u32 = 0o1000;

/// The engine's effective user.
fn engine_user() -> u32 {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes the cache directory if it does not exist yet (readable by the engine's user only),
/// then checks it may be trusted. `Err` says why not, naming the path.
pub(in crate::plugin) fn prepare(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    check_dir(dir)
}

/// Can anyone but the engine's user (or root) have written into `dir`? `Ok` if not.
pub(super) fn check_dir(dir: &Path) -> Result<(), String> {
    let me = engine_user();
    let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a directory", dir.display()));
    }
    if meta.uid() != me {
        return Err(format!(
            "{} belongs to user {}, not to the engine's user {me}; what is in it would run as native code",
            dir.display(),
            meta.uid()
        ));
    }
    if meta.mode() & WRITABLE_BY_OTHERS != 0 {
        return Err(format!(
            "{} is writable by others (mode {:o}); what is in it would run as native code: make it writable by the engine's user alone (chmod go-w)",
            dir.display(),
            meta.permissions().mode() & 0o7777
        ));
    }
    let absolute = std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for above in absolute.ancestors().skip(1) {
        let meta = std::fs::metadata(above).map_err(|e| format!("{}: {e}", above.display()))?;
        let owner_ok = meta.uid() == me || meta.uid() == 0;
        let mode = meta.mode();
        if !owner_ok || (mode & WRITABLE_BY_OTHERS != 0 && mode & STICKY == 0) {
            return Err(format!(
                "{} (above {}) can be changed by another user (owner {}, mode {:o}): the cache directory could be replaced",
                above.display(),
                dir.display(),
                meta.uid(),
                mode & 0o7777
            ));
        }
    }
    Ok(())
}

/// A cache file's bytes, if it exists and may be trusted (the engine's user's regular file,
/// not writable by others; its directory checked by the caller). `Ok(None)`: not cached.
pub(super) fn read_trusted(file: &Path) -> Result<Option<Vec<u8>>, String> {
    let mut opened = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let meta = opened.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.uid() != engine_user() || meta.mode() & WRITABLE_BY_OTHERS != 0 {
        return Err(format!(
            "not the engine user's own file (owner {}, mode {:o}); not read",
            meta.uid(),
            meta.mode() & 0o7777
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    opened.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        prepare(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        for mode in [0o777, 0o775, 0o757, 0o1777] {
            chmod(&dir, mode);
            let err = check_dir(&dir).unwrap_err();
            assert!(err.contains("writable by others"), "{mode:o}: {err}");
        }
        chmod(&dir, 0o755);
        check_dir(&dir).unwrap();
        // A parent others may write without the sticky bit: the cache could be swapped.
        chmod(root.path(), 0o777);
        let err = check_dir(&dir).unwrap_err();
        assert!(err.contains("could be replaced"), "{err}");
        chmod(root.path(), 0o1777);
        check_dir(&dir).unwrap();
        chmod(root.path(), 0o700);
    }

    #[test]
    fn a_file_others_can_write_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.cwasm");
        assert_eq!(read_trusted(&file).unwrap(), None);
        std::fs::write(&file, b"code").unwrap();
        chmod(&file, 0o600);
        assert_eq!(read_trusted(&file).unwrap().as_deref(), Some(&b"code"[..]));
        chmod(&file, 0o666);
        assert!(read_trusted(&file).unwrap_err().contains("not read"));
    }
}
