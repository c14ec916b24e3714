//! Which files of a listing a run takes, for big archives split over machines and runs: a shard
//! (`--shard K/N`: a file belongs to one shard by a hash of its path, so N machines that list the
//! same archive split it with no coordination, and a file added later changes no other file's
//! shard) minus the files already done (`--skip-done`: those with a result in an earlier run's
//! JSON lines). Paths are compared as printed (`Path::display`), so a run resumes when it is given
//! its inputs the same way.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// 16 bytes of SHA-256 of a path as printed: the key of shards and of done sets (memory per done
/// file stays 16 bytes, whatever its path's length).
fn path_key(path: &Path) -> [u8; 16] {
    let digest = Sha256::digest(path.display().to_string().as_bytes());
    let mut key = [0u8; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// Shard `index` (1-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub count: u32,
}

impl Shard {
    /// Whether `path` belongs to this shard.
    pub fn contains(&self, path: &Path) -> bool {
        let key = path_key(path);
        let h = u64::from_le_bytes(key[..8].try_into().expect("8 bytes"));
        h % u64::from(self.count) == u64::from(self.index - 1)
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Shard, String> {
        let bad = || format!("{s:?}: a shard is K/N with 1 <= K <= N (e.g. 1/4, 4/4)");
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            k.trim().parse::<u32>().map_err(|_| bad())?,
            n.trim().parse::<u32>().map_err(|_| bad())?,
        );
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Files with a result in an earlier run's JSON lines (`classify --json`): lines with `"file"`
/// and without `"error"`. Lines that are not such JSON (a line a killed run left half written)
/// are ignored, so their files are done again.
#[derive(Debug, Default)]
pub struct DoneSet {
    keys: HashSet<[u8; 16]>,
}

impl DoneSet {
    /// Reads `path`; a file that does not exist yet is an empty set (the first run of a resumable
    /// job).
    pub fn read(path: &Path) -> Result<DoneSet> {
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DoneSet::default()),
            Err(e) => return Err(Error::io(path, e)),
        };
        let mut keys = HashSet::new();
        for line in BufReader::new(file).split(b'\n') {
            let line = line.map_err(|e| Error::io(path, e))?;
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            if v.get("error").is_some() {
                continue;
            }
            if let Some(file) = v.get("file").and_then(|f| f.as_str()) {
                keys.insert(path_key(Path::new(file)));
            }
        }
        Ok(DoneSet { keys })
    }

    pub fn contains(&self, path: &Path) -> bool {
        self.keys.contains(&path_key(path))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn shards_are_disjoint_and_cover_the_listing() {
        let paths: Vec<PathBuf> = (0..10_000)
            .map(|i| PathBuf::from(format!("archive/{}/img-{i}.dcm", i % 37)))
            .collect();
        for n in [1u32, 2, 3, 7] {
            let shards: Vec<Shard> = (1..=n).map(|k| Shard { index: k, count: n }).collect();
            let mut sizes = vec![0usize; n as usize];
            for p in &paths {
                let owners: Vec<usize> =
                    (0..n as usize).filter(|&i| shards[i].contains(p)).collect();
                assert_eq!(
                    owners.len(),
                    1,
                    "{} in shards {owners:?} of {n}",
                    p.display()
                );
                sizes[owners[0]] += 1;
            }
            // Balanced within a few standard deviations of the binomial.
            let expected = paths.len() as f64 / n as f64;
            for s in sizes {
                assert!(
                    (s as f64 - expected).abs() < 5.0 * expected.sqrt() + 1.0,
                    "{s} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn shard_spec_is_k_of_n() {
        assert_eq!("2/4".parse::<Shard>(), Ok(Shard { index: 2, count: 4 }));
        assert_eq!("2/4".parse::<Shard>().unwrap().to_string(), "2/4");
        for bad in ["0/4", "5/4", "4", "a/b", "1/0", "-1/4", ""] {
            let e = bad.parse::<Shard>().unwrap_err();
            assert!(e.contains("K/N"), "{bad}: {e}");
        }
    }

    #[test]
    fn done_set_takes_results_not_errors_nor_broken_lines() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("out.jsonl");
        assert!(DoneSet::read(&f).unwrap().is_empty());
        std::fs::write(
            &f,
            concat!(
                "{\"file\":\"a.png\",\"model\":\"m\",\"top\":[]}\n",
                "{\"file\":\"b.png\",\"error\":\"unreadable\"}\n",
                "not json\n",
                "{\"file\":\"c.png\",\"mod",
            ),
        )
        .unwrap();
        let done = DoneSet::read(&f).unwrap();
        assert_eq!(done.len(), 1);
        assert!(done.contains(Path::new("a.png")));
        assert!(!done.contains(Path::new("b.png")) && !done.contains(Path::new("c.png")));
    }
}
