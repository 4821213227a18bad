//! A read-only view of a whole model file: memory-mapped, or, under Miri (which cannot run
//! file-backed mappings), read into an 8-aligned heap buffer, so that the readers' parsing
//! and bounds checks run under Miri as they run in production.

use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use crate::IoError;

/// The bytes of one file, mapped (or read, under Miri) once and borrowed by its reader.
pub(crate) struct FileMap {
    #[cfg(not(miri))]
    map: memmap2::Mmap,
    /// (len.div_ceil(8)) words holding the file; `len` bytes of them are the file.
    #[cfg(miri)]
    words: Vec<u64>,
    #[cfg(miri)]
    len: usize,
}

impl FileMap {
    /// Maps `path` read-only; `Err` names the file and the failed operation.
    pub(crate) fn open(path: &Path) -> Result<FileMap, IoError> {
        let file = File::open(path).map_err(|e| IoError::os(path, "open", e))?;
        Self::of_file(path, file)
    }

    #[cfg(not(miri))]
    fn of_file(path: &Path, file: File) -> Result<FileMap, IoError> {
        // SAFETY: the map is read-only and lives as long as the reader that owns it, which
        // hands out only borrows of it. Like llama.cpp, candle and every safetensors loader
        // we assume no one truncates or rewrites the file while it is mapped (our own
        // writers replace files by rename, which leaves an existing map intact); a
        // truncation under the map would fault on access.
        let map =
            unsafe { memmap2::Mmap::map(&file) }.map_err(|e| IoError::os(path, "memory-map", e))?;
        Ok(FileMap { map })
    }

    #[cfg(miri)]
    fn of_file(path: &Path, mut file: File) -> Result<FileMap, IoError> {
        use std::io::Read;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)
            .map_err(|e| IoError::os(path, "read", e))?;
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
        Ok(FileMap {
            words,
            len: bytes.len(),
        })
    }

    /// Lets the OS drop the resident pages that lie wholly inside `bytes`, a slice of this
    /// map that the caller has copied and will not read again (reading it again is still
    /// correct: the pages come back from the file). Slices from elsewhere are ignored.
    pub(crate) fn release(&self, bytes: &[u8]) {
        const PAGE: usize = 4096;
        let base = self.as_ptr() as usize;
        let start = bytes.as_ptr() as usize;
        if start < base || start + bytes.len() > base + self.len() {
            return;
        }
        let first = (start - base).next_multiple_of(PAGE);
        let end = (start - base + bytes.len()) / PAGE * PAGE;
        if end > first {
            self.drop_pages(first, end - first);
        }
    }

    // madvise exists on Unix only; elsewhere (and under Miri) the pages simply stay.
    #[cfg(all(unix, not(miri)))]
    fn drop_pages(&self, offset: usize, len: usize) {
        // SAFETY: the mapping is read-only and file-backed, so MADV_DONTNEED discards no
        // data: later reads of these pages fault them back in from the file unchanged, which
        // keeps every outstanding `&[u8]` into the map valid. On systems with larger pages
        // memmap2 rounds the start down, which drops at most a page that is faulted back in
        // on use.
        let _ = unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len)
        };
    }

    #[cfg(not(all(unix, not(miri))))]
    fn drop_pages(&self, _offset: usize, _len: usize) {}
}

impl Deref for FileMap {
    type Target = [u8];

    #[cfg(not(miri))]
    fn deref(&self) -> &[u8] {
        &self.map
    }

    #[cfg(miri)]
    fn deref(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }
}

impl std::fmt::Debug for FileMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileMap({} bytes)", self.len())
    }
}
