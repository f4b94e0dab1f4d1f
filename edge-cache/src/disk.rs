//! L2: blobs on local disk, one file per blob named by its hash, bounded in bytes.
//!
//! A blob reaches `blobs/` only by rename from `tmp/` after its fill was verified, so a file there is
//! always whole and right. The index is a moka cache weighed in bytes (TinyLFU admission, LRU
//! eviction); evicting an entry deletes its file. On open the index is rebuilt from the folder and
//! partial files from a previous run are removed.
//!
//! Hits are served without leaving the request's thread when they can be: the most used files stay
//! open (a second, count-bounded cache, like nginx's `open_file_cache`), and [`read_now`] reads them
//! with `RWF_NOWAIT`, which the kernel answers from its page cache or refuses rather than wait for
//! the device. Only an open or a read that would wait goes to the blocking pool.

use std::fs::File;
use std::io::IoSliceMut;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use rustix::io::{Errno, ReadWriteFlags};
use tempfile::NamedTempFile;
use types::BlobId;

/// The disk tier of one edge node.
#[derive(Clone)]
pub struct DiskTier {
    root: Arc<PathBuf>,
    index: moka::sync::Cache<BlobId, u64>,
    /// Open handles on the most used files; at most the count it was opened with.
    handles: moka::sync::Cache<BlobId, Arc<File>>,
}

/// Files kept open when [`DiskTier::open`] is not told otherwise.
pub const DEFAULT_OPEN_FILES: u64 = 1024;

impl DiskTier {
    /// Opens (creating) the tier under `dir`, holding at most `capacity` bytes of blobs and keeping
    /// up to [`DEFAULT_OPEN_FILES`] of them open. Evictions are counted in `evictions`.
    pub fn open(dir: &Path, capacity: u64, evictions: Counter) -> std::io::Result<Self> {
        Self::open_with(dir, capacity, DEFAULT_OPEN_FILES, evictions)
    }

    /// [`DiskTier::open`], keeping up to `open_files` files open (0: none).
    pub fn open_with(dir: &Path, capacity: u64, open_files: u64, evictions: Counter) -> std::io::Result<Self> {
        let root = Arc::new(dir.to_owned());
        std::fs::create_dir_all(dir.join("blobs"))?;
        std::fs::create_dir_all(dir.join("tmp"))?;
        for entry in std::fs::read_dir(dir.join("tmp"))? {
            std::fs::remove_file(entry?.path())?;
        }
        let handles = moka::sync::Cache::new(open_files);
        let listener_handles: moka::sync::Cache<BlobId, Arc<File>> = handles.clone();
        let listener_root = root.clone();
        let index = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .weigher(|_: &BlobId, size: &u64| u32::try_from(*size).unwrap_or(u32::MAX))
            .eviction_listener(move |id: Arc<BlobId>, _size, cause| {
                if cause.was_evicted() {
                    evictions.inc();
                }
                if cause != moka::notification::RemovalCause::Replaced {
                    listener_handles.invalidate(&*id);
                    // A file already gone is what we wanted anyway.
                    let _ = std::fs::remove_file(blob_path(&listener_root, &id));
                }
            })
            .build();
        let tier = Self { root, index, handles };
        tier.rebuild()?;
        Ok(tier)
    }

    fn rebuild(&self) -> std::io::Result<()> {
        for shard in std::fs::read_dir(self.root.join("blobs"))? {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(shard.path())? {
                let entry = entry?;
                let name = entry.file_name();
                match name.to_str().and_then(|n| n.parse::<BlobId>().ok()) {
                    Some(id) if entry.path() == blob_path(&self.root, &id) => {
                        self.index.insert(id, entry.metadata()?.len());
                    }
                    _ => std::fs::remove_file(entry.path())?,
                }
            }
        }
        self.index.run_pending_tasks();
        Ok(())
    }

    /// The size of a cached blob, counting as a use for eviction.
    pub fn lookup(&self, id: &BlobId) -> Option<u64> {
        self.index.get(id)
    }

    pub fn path(&self, id: &BlobId) -> PathBuf {
        blob_path(&self.root, id)
    }

    /// The blob's file if it is among those kept open; never blocks.
    pub fn open_handle(&self, id: &BlobId) -> Option<Arc<File>> {
        self.handles.get(id)
    }

    /// The blob's file, opened now if it was not kept open, and then kept. Blocking.
    pub fn open_file(&self, id: &BlobId) -> std::io::Result<Arc<File>> {
        if let Some(file) = self.handles.get(id) {
            return Ok(file);
        }
        let file = Arc::new(File::open(self.path(id))?);
        // A purge or eviction that ran since the lookup must not leave a handle behind.
        if self.index.contains_key(id) {
            self.handles.insert(*id, file.clone());
        }
        Ok(file)
    }

    /// A new temp file for a fill; deleted when dropped unless committed.
    pub fn temp_file(&self) -> std::io::Result<NamedTempFile> {
        tempfile::Builder::new().prefix("fill-").tempfile_in(self.root.join("tmp"))
    }

    /// Moves a verified fill into place and indexes it; evicts what no longer fits. Blocking.
    pub fn commit(&self, id: &BlobId, file: NamedTempFile, size: u64) -> std::io::Result<()> {
        let path = self.path(id);
        std::fs::create_dir_all(path.parent().expect("blob paths have a shard folder"))?;
        file.persist(&path).map_err(|e| e.error)?;
        self.index.insert(*id, size);
        self.index.run_pending_tasks();
        Ok(())
    }

    /// Forgets a blob and deletes its file (purge, or a file found missing or damaged). Blocking.
    pub fn remove(&self, id: &BlobId) {
        self.index.invalidate(id);
        self.index.run_pending_tasks();
        self.handles.invalidate(id);
        let _ = std::fs::remove_file(self.path(id));
    }

    /// Bytes of blobs held, and how many.
    pub fn usage(&self) -> (u64, u64) {
        self.index.run_pending_tasks();
        (self.index.weighted_size(), self.index.entry_count())
    }
}

/// `len` bytes of `file` from `pos`, if the page cache holds them all: read at once with
/// `RWF_NOWAIT`, so the calling thread never waits for the device. `None` when the read would wait
/// (or the kernel cannot promise that for this file system), when the file is shorter, or on an
/// error: the caller then reads on a blocking thread, which reports any real error.
pub(crate) fn read_now(file: &File, pos: u64, len: usize) -> Option<Bytes> {
    let mut buf = vec![0u8; len];
    let mut done = 0;
    while done < len {
        match rustix::io::preadv2(
            file,
            &mut [IoSliceMut::new(&mut buf[done..])],
            pos + done as u64,
            ReadWriteFlags::NOWAIT,
        ) {
            Ok(0) => return None,
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(_) => return None,
        }
    }
    Some(Bytes::from(buf))
}

/// `len` bytes of `file` from `pos`, waiting for the device if need be. Blocking.
pub(crate) fn read_at(file: &File, pos: u64, len: usize) -> std::io::Result<Bytes> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, pos)?;
    Ok(Bytes::from(buf))
}

fn blob_path(root: &Path, id: &BlobId) -> PathBuf {
    let hex = id.to_hex();
    root.join("blobs").join(&hex[..2]).join(hex)
}

impl std::fmt::Debug for DiskTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiskTier({})", self.root.display())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn fill(tier: &DiskTier, bytes: &[u8]) -> BlobId {
        let id = BlobId::of(bytes);
        let mut file = tier.temp_file().unwrap();
        file.write_all(bytes).unwrap();
        tier.commit(&id, file, bytes.len() as u64).unwrap();
        id
    }

    fn bytes_on_disk(dir: &Path) -> u64 {
        walk(&dir.join("blobs")).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum()
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.path().is_dir() { out.extend(walk(&entry.path())) } else { out.push(entry.path()) }
        }
        out
    }

    /// Random fills, reads, removals and restarts, checked against what must always hold: the bound,
    /// an index that names only whole, correct files, and no file the index has forgotten.
    #[test]
    fn random_operations_keep_index_and_folder_in_step() {
        let dir = tempfile::tempdir().unwrap();
        let capacity = 60_000;
        let mut tier = DiskTier::open(dir.path(), capacity, Counter::default()).unwrap();
        let mut state: u32 = 0x9E37_79B9;
        let mut next = |below: u32| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state % below
        };
        let mut known: Vec<BlobId> = Vec::new();
        for step in 0..400 {
            match next(10) {
                0..=5 => {
                    let len = 500 + next(15_000) as usize;
                    let seed = next(u32::MAX) as u8;
                    let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
                    known.push(fill(&tier, &bytes));
                }
                6 | 7 if !known.is_empty() => {
                    let id = known[next(known.len() as u32) as usize];
                    if let Some(size) = tier.lookup(&id) {
                        let bytes = std::fs::read(tier.path(&id)).expect("an indexed blob has its file");
                        assert_eq!(bytes.len() as u64, size);
                        assert!(id.matches(&bytes), "step {step}: an indexed file is not its blob");
                    }
                }
                8 if !known.is_empty() => tier.remove(&known[next(known.len() as u32) as usize]),
                _ => {
                    drop(tier);
                    tier = DiskTier::open(dir.path(), capacity, Counter::default()).unwrap();
                }
            }
            let (used, _) = tier.usage();
            assert!(used <= capacity, "step {step}: {used} bytes indexed");
            let files = walk(&dir.path().join("blobs"));
            assert!(bytes_on_disk(dir.path()) <= capacity, "step {step}: {} bytes on disk", bytes_on_disk(dir.path()));
            for file in files {
                let id: BlobId = file.file_name().unwrap().to_str().unwrap().parse().unwrap();
                assert!(tier.lookup(&id).is_some(), "step {step}: {id} is on disk but not indexed");
            }
        }
    }

    #[test]
    fn open_files_are_bounded_and_closed_with_their_blob() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open_with(dir.path(), 25_000, 2, Counter::default()).unwrap();
        let ids: Vec<BlobId> = (0..3u8).map(|i| fill(&tier, &vec![i; 10_000])).collect();
        tier.usage();
        // Only two of the three fit; opening those keeps both open, the most it may.
        let kept: Vec<BlobId> = ids.iter().copied().filter(|id| tier.lookup(id).is_some()).collect();
        assert_eq!(kept.len(), 2);
        for id in &kept {
            let file = tier.open_file(id).unwrap();
            assert_eq!(read_now(&file, 0, 10_000).as_deref(), Some(&std::fs::read(tier.path(id)).unwrap()[..]));
            assert!(tier.open_handle(id).is_some());
        }
        tier.remove(&kept[0]);
        assert!(tier.open_handle(&kept[0]).is_none(), "a removed blob's file stays open");
        // Fills that evict the other drop its handle too.
        for i in 0..100u8 {
            if !tier.index.contains_key(&kept[1]) {
                break;
            }
            // Asked for before it is filled, as a hot blob would be: TinyLFU admits it.
            let bytes = vec![100 + i; 10_000];
            (0..5).for_each(|_| _ = tier.lookup(&BlobId::of(&bytes)));
            fill(&tier, &bytes);
            tier.usage();
        }
        assert!(!tier.index.contains_key(&kept[1]), "nothing evicted the blob");
        tier.handles.run_pending_tasks();
        assert!(tier.open_handle(&kept[1]).is_none(), "an evicted blob's file stays open");
    }

    #[test]
    fn reads_without_waiting_only_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        // Just written, so in the page cache.
        assert_eq!(read_now(&file, 1000, 5000).as_deref(), Some(&bytes[1000..6000]));
        assert_eq!(read_now(&file, 99_000, 2000), None, "a read past the end is no answer");
        assert_eq!(read_at(&file, 99_000, 1000).unwrap(), bytes[99_000..]);
        assert!(read_at(&file, 99_000, 2000).is_err());
    }

    #[test]
    fn stays_under_its_bound_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 100_000, Counter::default()).unwrap();
        let ids: Vec<BlobId> = (0..40u32).map(|i| fill(&tier, &vec![i as u8; 10_000])).collect();
        let (used, count) = tier.usage();
        assert!(used <= 100_000, "index holds {used} bytes");
        assert!(count >= 5, "only {count} blobs kept");
        assert!(bytes_on_disk(dir.path()) <= 100_000, "{} bytes on disk", bytes_on_disk(dir.path()));

        // A crash mid-fill leaves a temp file and maybe a stray; both go on the next open.
        std::fs::write(dir.path().join("tmp/fill-x"), b"partial").unwrap();
        let kept: Vec<BlobId> = ids.iter().copied().filter(|id| tier.lookup(id).is_some()).collect();
        drop(tier);
        let tier = DiskTier::open(dir.path(), 100_000, Counter::default()).unwrap();
        assert!(walk(&dir.path().join("tmp")).is_empty());
        for id in &kept {
            assert_eq!(tier.lookup(id), Some(10_000));
            assert!(id.matches(&std::fs::read(tier.path(id)).unwrap()));
        }
        tier.remove(&kept[0]);
        assert_eq!(tier.lookup(&kept[0]), None);
        assert!(!tier.path(&kept[0]).exists());
    }
}
