//! The user's files are theirs alone. A data directory p2pchat creates is 0700, and every file it
//! writes there (the identity, the known keys, the message log, and SQLite's `-wal` and `-shm`
//! beside it, which SQLite creates with the log's own mode) is 0600 from the moment it exists, so
//! no other account on the machine can read who you talk to or what was said. Elsewhere than on
//! Unix, the platform's defaults apply.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Create `dir` and its missing parents, owner-only. An existing directory is left as it is (it
/// may be one the user chose, such as the current one).
pub fn create_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Make sure the file at `path` exists and only its owner can read or write it (an older
/// p2pchat's log, made with the default mode, is narrowed: it is ours).
pub fn own_file(path: &Path) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if file.metadata()?.permissions().mode() & 0o077 != 0 {
            file.set_permissions(fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

/// A new owner-only file beside `path` holding `bytes`, synced: the caller moves it into place.
pub(crate) fn write_beside(path: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    let temporary = path.with_extension(format!("new-{}", crate::wire::frames::random_id()));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options.open(&temporary).and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()));
    match written {
        Ok(()) => Ok(temporary),
        Err(err) => {
            let _ = fs::remove_file(&temporary);
            Err(err)
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_directories_and_files_are_the_owners_alone_and_a_loose_file_of_ours_is_narrowed() {
        let base = std::env::temp_dir().join(format!("p2pchat-owner-{}", crate::wire::frames::random_id()));
        let dir = base.join("a").join("b");
        create_dir(&dir).unwrap();
        assert_eq!((mode(&base), mode(&dir)), (0o700, 0o700));
        let file = dir.join("log");
        own_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        own_file(&file).unwrap();
        assert_eq!(mode(&file), 0o600);
        let placed = write_beside(&file, b"x").unwrap();
        assert_eq!(mode(&placed), 0o600);
        fs::remove_dir_all(&base).unwrap();
    }
}
