//! A per-item result cache, so that an interrupted evaluation resumes where it stopped.
//!
//! One append-only jsonl file; each line is one finished item:
//! `{"task":"hellaswag","index":17,"run":"9e3c0f2a6b1d4e85","result":{...}}`. `run` is a
//! [`RunHash`] of everything that decides the result besides the item (model identity,
//! prompt format version, shots, context size, ...), so one file can hold several tasks and
//! settings without mixing them up: a lookup only sees records of the same run.
//!
//! A run killed mid-write leaves a partial last line. Opening the cache drops it (and cuts it
//! from the file, so the next record starts on a line of its own); that item is simply
//! computed again. Any other unreadable line is an error naming the line, because only a
//! second writer or outside editing can produce one, and guessing past it could resume from
//! the wrong results.
//!
//! Records are written with one `write` each, unbuffered, so a killed process loses at most
//! the item in flight. Floats round-trip exactly through `serde_json`, except that NaN and
//! ±inf are written as `null` and then fail to read back (as an error, not a wrong value).

use std::collections::HashMap;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// Errors raised by the result cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("result cache {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("result cache {} line {line}: {message} (delete the file to start the evaluation over)", path.display())]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("result cache {}: cannot encode the result of {task} item {index}: {message}", path.display())]
    Encode {
        path: PathBuf,
        task: String,
        index: usize,
        message: String,
    },
}

/// A stable 64-bit hash of the settings a result depends on.
///
/// FNV-1a over length-prefixed `(name, value)` pairs: stable across Rust versions and
/// platforms (unlike `std`'s `DefaultHasher`), and the length prefixes keep
/// `("ab", "c")` and `("a", "bc")` apart. Not a cryptographic hash; a collision needs two
/// different settings of the same task in the same file and 64 bits make that negligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunHash(u64);

impl RunHash {
    /// Hashes the fields in the order given; callers should list every setting that changes
    /// a result, e.g. `[("model", id), ("task", "mmlu"), ("shots", "5"), ("n_ctx", "2048"),
    /// ("prompt_format", "1")]`.
    pub fn new<K: AsRef<str>, V: AsRef<str>>(fields: &[(K, V)]) -> Self {
        const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut hash = OFFSET;
        let mut feed = |bytes: &[u8]| {
            for &byte in bytes {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(PRIME);
            }
        };
        for (name, value) in fields {
            for part in [name.as_ref(), value.as_ref()] {
                feed(&(part.len() as u64).to_le_bytes());
                feed(part.as_bytes());
            }
        }
        RunHash(hash)
    }

    /// Parses the 16 hex digits written by `Display`.
    pub fn from_hex(hex: &str) -> Option<Self> {
        (hex.len() == 16)
            .then(|| u64::from_str_radix(hex, 16).ok())
            .flatten()
            .map(RunHash)
    }
}

impl fmt::Display for RunHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Serialize for RunHash {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for RunHash {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let hex = String::deserialize(deserializer)?;
        RunHash::from_hex(&hex).ok_or_else(|| {
            serde::de::Error::custom(format!("run hash must be 16 hex digits, found \"{hex}\""))
        })
    }
}

#[derive(Serialize)]
struct RecordOut<'a, T> {
    task: &'a str,
    index: usize,
    run: RunHash,
    result: &'a T,
}

#[derive(Deserialize)]
struct RecordIn {
    task: String,
    index: usize,
    run: RunHash,
    result: Value,
}

/// What opening the cache found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovery {
    /// Complete records read (of every run).
    pub records: usize,
    /// Bytes of a partial last line that were cut (a killed run), 0 when the file was whole.
    pub dropped_bytes: u64,
}

/// The append-only result cache. Results are stored as JSON and decoded on lookup, so one
/// file can hold different result types (multiple-choice scores, generations).
pub struct ResultCache {
    path: PathBuf,
    file: File,
    /// (task, index, run) → (1-based line, result); a later record of the same key wins.
    entries: HashMap<(String, usize, RunHash), (usize, Value)>,
    recovery: Recovery,
    /// The 1-based line the next record will be written on, for error messages.
    next_line: usize,
}

impl ResultCache {
    /// Opens (or creates) the cache file, reads every complete record and cuts a partial last
    /// line left by a killed run.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CacheError> {
        let path = path.as_ref().to_path_buf();
        let io = |source| CacheError::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;

        // Everything after the last newline is a record whose write did not finish.
        let complete = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |last| last + 1);
        let dropped_bytes = (bytes.len() - complete) as u64;
        if dropped_bytes > 0 {
            file.set_len(complete as u64).map_err(io)?;
        }

        let mut entries = HashMap::new();
        let mut records = 0;
        let next_line = bytes[..complete].iter().filter(|&&b| b == b'\n').count() + 1;
        for (index, raw) in bytes[..complete].split(|&b| b == b'\n').enumerate() {
            let line = index + 1;
            if raw.is_empty() {
                continue;
            }
            let corrupt = |message: String| CacheError::Corrupt {
                path: path.clone(),
                line,
                message,
            };
            let record: RecordIn = serde_json::from_slice(raw)
                .map_err(|e| corrupt(format!("not a cache record ({e})")))?;
            entries.insert(
                (record.task, record.index, record.run),
                (line, record.result),
            );
            records += 1;
        }
        Ok(ResultCache {
            path,
            file,
            entries,
            recovery: Recovery {
                records,
                dropped_bytes,
            },
            next_line,
        })
    }

    /// The cached result of one item under one run, decoded as `T`.
    pub fn get<T: DeserializeOwned>(
        &self,
        task: &str,
        index: usize,
        run: RunHash,
    ) -> Result<Option<T>, CacheError> {
        let Some((line, value)) = self.entries.get(&(task.to_string(), index, run)) else {
            return Ok(None);
        };
        T::deserialize(value)
            .map(Some)
            .map_err(|e| CacheError::Corrupt {
                path: self.path.clone(),
                line: *line,
                message: format!("the result of {task} item {index} does not decode ({e})"),
            })
    }

    /// Whether a result of this item under this run is cached.
    pub fn contains(&self, task: &str, index: usize, run: RunHash) -> bool {
        self.entries.contains_key(&(task.to_string(), index, run))
    }

    /// Appends one finished item and keeps it for lookups.
    pub fn insert<T: Serialize>(
        &mut self,
        task: &str,
        index: usize,
        run: RunHash,
        result: &T,
    ) -> Result<(), CacheError> {
        let encode_error = |e: serde_json::Error| CacheError::Encode {
            path: self.path.clone(),
            task: task.to_string(),
            index,
            message: e.to_string(),
        };
        let value = serde_json::to_value(result).map_err(encode_error)?;
        let record = RecordOut {
            task,
            index,
            run,
            result: &value,
        };
        let mut line = serde_json::to_string(&record).map_err(encode_error)?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|source| CacheError::Io {
                path: self.path.clone(),
                source,
            })?;
        self.entries
            .insert((task.to_string(), index, run), (self.next_line, value));
        self.next_line += 1;
        Ok(())
    }

    /// How many items of `task` under `run` are cached (for a resumed run's progress bar).
    pub fn completed(&self, task: &str, run: RunHash) -> usize {
        self.entries
            .keys()
            .filter(|(t, _, r)| t == task && *r == run)
            .count()
    }

    /// What opening found: the records read and any partial line cut.
    pub fn recovery(&self) -> Recovery {
        self.recovery
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::score::{score_choices, ChoiceResult, McScore, MeanStderr};

    fn run() -> RunHash {
        RunHash::new(&[
            ("model", "tiny.gguf:1234"),
            ("task", "hellaswag"),
            ("shots", "0"),
        ])
    }

    #[test]
    fn run_hash_is_stable_and_separates_fields() {
        // Pinned: a change here silently invalidates every cache on disk.
        assert_eq!(
            RunHash::new::<&str, &str>(&[]).to_string(),
            "cbf29ce484222325"
        );
        let hash = RunHash::new(&[("model", "m"), ("shots", "5")]);
        assert_eq!(hash.to_string(), format!("{hash}"));
        assert_eq!(RunHash::from_hex(&hash.to_string()), Some(hash));
        assert_ne!(RunHash::new(&[("ab", "c")]), RunHash::new(&[("a", "bc")]));
        assert_ne!(
            RunHash::new(&[("shots", "5")]),
            RunHash::new(&[("shots", "0")])
        );
        assert_eq!(RunHash::from_hex("xyz"), None);
        assert_eq!(RunHash::from_hex("0123456789abcdefg"), None);
    }

    #[test]
    fn write_kill_reopen_keeps_completed_items() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs/cache.jsonl");
        {
            let mut cache = ResultCache::open(&path).unwrap();
            for index in 0..4 {
                cache
                    .insert("hellaswag", index, run(), &(index as f64 * -1.5))
                    .unwrap();
            }
        }
        // "Kill" the run while it wrote item 3: cut its line in the middle.
        let bytes = std::fs::read(&path).unwrap();
        let last_line_start = bytes[..bytes.len() - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .unwrap()
            + 1;
        let cut = last_line_start + (bytes.len() - last_line_start) / 2;
        std::fs::write(&path, &bytes[..cut]).unwrap();

        let mut cache = ResultCache::open(&path).unwrap();
        assert_eq!(cache.recovery().records, 3);
        assert_eq!(
            cache.recovery().dropped_bytes,
            (cut - last_line_start) as u64
        );
        for index in 0..3 {
            let value: Option<f64> = cache.get("hellaswag", index, run()).unwrap();
            assert_eq!(value, Some(index as f64 * -1.5));
        }
        assert_eq!(cache.get::<f64>("hellaswag", 3, run()).unwrap(), None);
        assert_eq!(cache.completed("hellaswag", run()), 3);

        // The resumed run appends on a fresh line; the file reads back whole.
        cache.insert("hellaswag", 3, run(), &-4.5).unwrap();
        drop(cache);
        let cache = ResultCache::open(&path).unwrap();
        assert_eq!(
            cache.recovery(),
            Recovery {
                records: 4,
                dropped_bytes: 0
            }
        );
        assert_eq!(cache.get::<f64>("hellaswag", 3, run()).unwrap(), Some(-4.5));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 4);
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn runs_and_tasks_do_not_mix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.jsonl");
        let other = RunHash::new(&[("model", "other.gguf")]);
        let mut cache = ResultCache::open(&path).unwrap();
        cache.insert("hellaswag", 0, run(), &1u32).unwrap();
        cache.insert("hellaswag", 0, other, &2u32).unwrap();
        cache.insert("arc_challenge", 0, run(), &"text").unwrap();
        assert_eq!(cache.get::<u32>("hellaswag", 0, run()).unwrap(), Some(1));
        assert_eq!(cache.get::<u32>("hellaswag", 0, other).unwrap(), Some(2));
        assert_eq!(
            cache
                .get::<String>("arc_challenge", 0, run())
                .unwrap()
                .as_deref(),
            Some("text")
        );
        assert!(!cache.contains("mmlu", 0, run()));
        // A later record of the same key wins.
        cache.insert("hellaswag", 0, run(), &3u32).unwrap();
        drop(cache);
        let cache = ResultCache::open(&path).unwrap();
        assert_eq!(cache.get::<u32>("hellaswag", 0, run()).unwrap(), Some(3));
        // Decoding as the wrong type is an error naming the line.
        let message = cache
            .get::<u32>("arc_challenge", 0, run())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("line 3: the result of arc_challenge item 0 does not decode"),
            "{message}"
        );
    }

    #[test]
    fn a_corrupt_complete_line_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.jsonl");
        let good = format!(
            r#"{{"task":"mmlu","index":0,"run":"{}","result":1}}"#,
            run()
        );
        for bad in [
            "garbage",
            r#"{"task":"mmlu","index":-1,"run":"00","result":1}"#,
            "{}",
        ] {
            std::fs::write(&path, format!("{good}\n{bad}\n{good}\n")).unwrap();
            let message = ResultCache::open(&path).err().unwrap().to_string();
            assert!(message.contains("line 2: not a cache record"), "{message}");
            assert!(message.ends_with("(delete the file to start the evaluation over)"));
        }
        // A partial line that happens to be valid JSON is still dropped: only a newline
        // marks a record as written.
        std::fs::write(&path, format!("{good}\n{good}")).unwrap();
        let cache = ResultCache::open(&path).unwrap();
        assert_eq!(cache.recovery().records, 1);
        assert_eq!(cache.recovery().dropped_bytes, good.len() as u64);
    }

    #[test]
    fn empty_and_missing_files_are_empty_caches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.jsonl");
        let cache = ResultCache::open(&path).unwrap();
        assert_eq!(cache.recovery(), Recovery::default());
        std::fs::write(&path, "partial").unwrap();
        let cache = ResultCache::open(&path).unwrap();
        assert_eq!(
            cache.recovery(),
            Recovery {
                records: 0,
                dropped_bytes: 7
            }
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"");
    }

    /// A deterministic stand-in for the model: per-choice log-likelihoods from the indices.
    fn fake_choices(item: usize) -> Vec<ChoiceResult> {
        (0..4)
            .map(|c| {
                let loglik = -(((item * 7 + c * 13) % 11) as f64) - 0.25 * c as f64;
                ChoiceResult::new(loglik, c == item % 4, &"ending".repeat(c + 1))
            })
            .collect()
    }

    /// An evaluation loop over the cache: what the CLI will do.
    fn evaluate(
        cache: &mut ResultCache,
        n_items: usize,
        stop_after: Option<usize>,
    ) -> Option<Vec<McScore>> {
        let mut scores = Vec::new();
        let mut computed = 0;
        for item in 0..n_items {
            let score = match cache.get::<McScore>("hellaswag", item, run()).unwrap() {
                Some(score) => score,
                None => {
                    if stop_after == Some(computed) {
                        return None;
                    }
                    computed += 1;
                    let score = score_choices(&fake_choices(item), item % 3).unwrap();
                    cache.insert("hellaswag", item, run(), &score).unwrap();
                    score
                }
            };
            scores.push(score);
        }
        Some(scores)
    }

    #[test]
    fn a_resumed_run_equals_an_uninterrupted_one() {
        let dir = tempfile::tempdir().unwrap();
        let n_items = 50;

        let whole_path = dir.path().join("whole.jsonl");
        let whole = evaluate(&mut ResultCache::open(&whole_path).unwrap(), n_items, None).unwrap();

        let path = dir.path().join("resumed.jsonl");
        assert!(evaluate(&mut ResultCache::open(&path).unwrap(), n_items, Some(17)).is_none());
        // Killed mid-record: append half a line.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(br#"{"task":"hellaswag","index":17,"run":"#);
        std::fs::write(&path, bytes).unwrap();
        let mut cache = ResultCache::open(&path).unwrap();
        assert_eq!(cache.completed("hellaswag", run()), 17);
        let resumed = evaluate(&mut cache, n_items, None).unwrap();

        assert_eq!(resumed, whole);
        let mean =
            |scores: &[McScore]| MeanStderr::of_bools(scores.iter().map(|s| s.acc_norm)).unwrap();
        assert_eq!(mean(&resumed), mean(&whole));
        // Both files hold the same records, in the same order.
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&whole_path).unwrap()
        );
    }
}
