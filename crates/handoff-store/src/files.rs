//! Files at rest: the data directory is `0700` and every file in it `0600`, whatever the umask.
//! The journal holds raw e-mail addresses and phone numbers; nobody but the gateway's own user
//! may read it.
//!
//! SQLite creates a database's `-wal` and `-shm` files with the mode of the database file, so
//! creating each database file `0600` before SQLite opens it covers those too.

use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of the data directory (and any directory in it).
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file in the data directory.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) `0700`; an existing one is tightened to `0700`.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    tighten_one(dir, DIR_MODE).map(|_| ())
}

/// Creates `path` empty and `0600` if it does not exist (never truncates); an existing file is
/// tightened to `0600`.
pub fn create_file(path: &Path) -> io::Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .open(path)?;
    tighten_one(path, FILE_MODE).map(|_| ())
}

/// Removes group and other permissions from `path` if it has any, keeping at most `mode`.
/// Returns whether it had to.
fn tighten_one(path: &Path, mode: u32) -> io::Result<bool> {
    let meta = std::fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Ok(false);
    }
    let current = meta.permissions().mode() & 0o777;
    if current & !mode == 0 {
        return Ok(false);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(current & mode))?;
    Ok(true)
}

/// Tightens `dir` to `0700` and every file and directory in it (recursively) to `0600` /
/// `0700`. Returns each path that was looser, with the mode it had, so `serve` can say so.
/// Entries owned by another user (a volume's `lost+found`) are left alone, and one that cannot
/// be changed is logged, not fatal: only `dir` itself must be ours.
pub fn tighten(dir: &Path) -> io::Result<Vec<(PathBuf, u32)>> {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::symlink_metadata(dir)?.uid();
    let mut fixed = Vec::new();
    let before = std::fs::symlink_metadata(dir)?.permissions().mode() & 0o777;
    if tighten_one(dir, DIR_MODE)? {
        fixed.push((dir.to_path_buf(), before));
    }
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(path = %d.display(), error = %e, "cannot read a directory in the data directory to check its modes");
                continue;
            }
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.uid() != owner || meta.file_type().is_symlink() {
                continue;
            }
            let mode = if meta.is_dir() {
                pending.push(path.clone());
                DIR_MODE
            } else if meta.is_file() {
                FILE_MODE
            } else {
                continue;
            };
            let before = meta.permissions().mode() & 0o777;
            match tighten_one(&path, mode) {
                Ok(true) => fixed.push((path, before)),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot tighten the mode of a file in the data directory")
                }
            }
        }
    }
    Ok(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn modes_are_tight_whatever_was_there() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        create_dir(&dir).unwrap();
        assert_eq!(mode(&dir), DIR_MODE);
        let file = dir.join("x.db");
        create_file(&file).unwrap();
        assert_eq!(mode(&file), FILE_MODE);
        std::fs::write(&file, b"kept").unwrap();
        create_file(&file).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"kept", "never truncated");

        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let loose = dir.join("loose-wal");
        std::fs::write(&loose, b"").unwrap();
        std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o666)).unwrap();
        let mut fixed = tighten(&dir).unwrap();
        fixed.sort();
        assert_eq!(
            fixed,
            vec![
                (dir.clone(), 0o755),
                (loose.clone(), 0o666),
                (file.clone(), 0o644)
            ]
        );
        assert_eq!(
            (mode(&dir), mode(&file), mode(&loose)),
            (0o700, 0o600, 0o600)
        );
        assert!(tighten(&dir).unwrap().is_empty());
    }
}
