//! Durable replacement of files and folders: a crash or power loss at any moment leaves
//! either the old version or the complete new one, never a torn file.
//!
//! A rename is atomic, but without a flush the file system may persist the rename before the
//! data it points to: after a crash the new name holds zeros or a short file. So the data is
//! flushed (`fsync`) before the rename, and the parent folder after it, so that the rename
//! itself survives.

use std::fs::File;
use std::io;
use std::path::Path;

/// Flushes the file at `path` to stable storage.
pub fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Flushes the entries of the folder at `path` (so that files created or renamed in it
/// persist). A no-op where folders cannot be opened as files (Windows).
pub fn sync_dir(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(path)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        Ok(())
    }
}

/// Flushes every file under `path` (recursively) and, as far as the file system allows,
/// every folder, `path` included.
fn sync_tree(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            sync_tree(&entry?.path())?;
        }
        // Some file systems cannot flush a folder; its files are flushed either way.
        let _ = sync_dir(path);
        Ok(())
    } else {
        sync_file(path)
    }
}

/// Moves the finished `tmp` (a file or a folder) to `dest` durably: flushes its contents,
/// then [`rename_flushed`].
///
/// # Errors
/// When a file cannot be read back and flushed, or the rename fails.
pub fn commit_rename(tmp: &Path, dest: &Path) -> io::Result<()> {
    sync_tree(tmp)?;
    rename_flushed(tmp, dest)
}

/// Renames `tmp`, whose contents are already flushed, over `dest` (an existing file is
/// replaced atomically; a folder `dest` must not exist), then flushes `dest`'s parent folder
/// where the file system can, so that the rename itself survives a crash (the contents are
/// complete either way, which is not worth failing the write over).
pub fn rename_flushed(tmp: &Path, dest: &Path) -> io::Result<()> {
    std::fs::rename(tmp, dest)?;
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty());
    let _ = sync_dir(parent.unwrap_or(Path::new(".")));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_folders_are_committed_whole() {
        let root = std::env::temp_dir().join(format!("ef-durable-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        // A file replaces the old one.
        let (tmp, dest) = (root.join("a.tmp"), root.join("a"));
        std::fs::write(&dest, "old").unwrap();
        std::fs::write(&tmp, "new").unwrap();
        commit_rename(&tmp, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "new");
        assert!(!tmp.exists());
        // A folder with a nested folder moves into place.
        let (tmp_dir, dest_dir) = (root.join("d.tmp"), root.join("d"));
        std::fs::create_dir_all(tmp_dir.join("inner")).unwrap();
        std::fs::write(tmp_dir.join("inner/x"), "x").unwrap();
        commit_rename(&tmp_dir, &dest_dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dest_dir.join("inner/x")).unwrap(),
            "x"
        );
        // A missing source is an error, and nothing is created.
        assert!(commit_rename(&root.join("none"), &root.join("none2")).is_err());
        assert!(!root.join("none2").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
