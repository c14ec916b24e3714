//! Labelled image sets in their published layouts, shared by the trainer and `runtime eval`:
//!
//! - image folder: `ROOT/<label>/*.{png,jpg,jpeg,dcm,dicom}` (labels sorted by folder name);
//! - UNIFESP (Kaggle): `ROOT/train.csv` (`SOPInstanceUID,Target`, Target = space-separated label
//!   indices 0..21) and `ROOT/train/<Study>/<Series>/<SOPInstanceUID>-c.dcm`;
//! - IRMA (ImageCLEF 2009): a `;`-separated code file (`image_id;irma_code;...`) and `<image_id>.png`,
//!   grouped into the reference's 15 anatomical categories.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::files::collect_images;
use crate::labels::{self, Label};

/// One image and its label indices (several for UNIFESP's multi-label rows).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub path: PathBuf,
    pub labels: Vec<usize>,
}

impl Sample {
    /// The label used for training (the first one).
    pub fn primary(&self) -> usize {
        self.labels[0]
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub labels: Vec<Label>,
    pub samples: Vec<Sample>,
    /// Rows that named a missing file or could not be parsed (reported, not fatal).
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    Folder,
    Unifesp,
    Irma,
}

impl std::str::FromStr for DatasetKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "folder" => Ok(DatasetKind::Folder),
            "unifesp" => Ok(DatasetKind::Unifesp),
            "irma" => Ok(DatasetKind::Irma),
            other => Err(format!(
                "unknown dataset {other:?} (folder, unifesp or irma)"
            )),
        }
    }
}

pub fn load(kind: DatasetKind, root: &Path) -> Result<Dataset> {
    let ds = match kind {
        DatasetKind::Folder => image_folder(root)?,
        DatasetKind::Unifesp => unifesp(root)?,
        DatasetKind::Irma => irma(root)?,
    };
    if ds.samples.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: the data set has no images",
            root.display()
        )));
    }
    Ok(ds)
}

pub fn image_folder(root: &Path) -> Result<Dataset> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no label folders (expected ROOT/<label>/images)",
            root.display()
        )));
    }
    let mut labels = Vec::new();
    let mut samples = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let name = d
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        labels.push(Label::new(name.clone(), folder_display_name(&name)));
        for path in collect_images(d)? {
            samples.push(Sample {
                path,
                labels: vec![i],
            });
        }
    }
    Ok(Dataset {
        name: format!("folder:{}", root.display()),
        labels,
        samples,
        problems: Vec::new(),
    })
}

/// Readable names for folder labels: MedNIST's short names are expanded; others are kept.
fn folder_display_name(name: &str) -> String {
    match name {
        "CXR" => "chest X-ray".into(),
        "Hand" => "hand X-ray".into(),
        "HeadCT" => "head CT".into(),
        "ChestCT" => "chest CT".into(),
        "AbdomenCT" => "abdomen CT".into(),
        "BreastMRI" => "breast MRI".into(),
        other => other.replace(['_', '-'], " "),
    }
}

pub fn unifesp(root: &Path) -> Result<Dataset> {
    let csv_path = root.join("train.csv");
    let text = std::fs::read_to_string(&csv_path).map_err(|e| Error::io(&csv_path, e))?;
    // SOPInstanceUID -> file, from the DICOM tree.
    let mut files: HashMap<String, PathBuf> = HashMap::new();
    let tree = root.join("train");
    for p in collect_images(&tree)? {
        if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
            files.insert(stem.trim_end_matches("-c").to_string(), p);
        }
    }
    let mut samples = Vec::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (n == 0 && line.to_ascii_lowercase().starts_with("sopinstanceuid")) {
            continue;
        }
        let Some((uid, target)) = line.split_once(',') else {
            problems.push(format!("train.csv line {}: no comma", n + 1));
            continue;
        };
        let parsed: std::result::Result<Vec<usize>, _> =
            target.split_whitespace().map(str::parse::<usize>).collect();
        let labels = match parsed {
            Ok(l) if !l.is_empty() && l.iter().all(|&i| i < labels::UNIFESP_NAMES.len()) => l,
            _ => {
                problems.push(format!("train.csv line {}: bad target {target:?}", n + 1));
                continue;
            }
        };
        match files.get(uid.trim()) {
            Some(path) => samples.push(Sample {
                path: path.clone(),
                labels,
            }),
            None => problems.push(format!("train.csv line {}: no file for {uid}", n + 1)),
        }
    }
    Ok(Dataset {
        name: "unifesp".into(),
        labels: labels::unifesp(),
        samples,
        problems,
    })
}

/// IRMA category (1..=15) of a code `TTTT-DDD-AAA-BBB`: the first digit of the anatomical axis
/// (1..9); chest codes `51x`..`56x` become the second-level chest categories 10..15.
pub fn irma_category(code: &str) -> Option<usize> {
    let parts: Vec<&str> = code.trim().split('-').collect();
    if parts.len() != 4
        || [4, 3, 3, 3]
            != [
                parts[0].len(),
                parts[1].len(),
                parts[2].len(),
                parts[3].len(),
            ]
    {
        return None;
    }
    if !parts
        .iter()
        .all(|p| p.chars().all(|c| c.is_ascii_alphanumeric()))
    {
        return None;
    }
    let a: Vec<u32> = parts[2]
        .chars()
        .map(|c| c.to_digit(10))
        .collect::<Option<_>>()?;
    match (a[0], a[1]) {
        (5, d @ 1..=6) => Some(9 + d as usize),
        (first @ 1..=9, _) => Some(first as usize),
        _ => None,
    }
}

pub fn irma(root: &Path) -> Result<Dataset> {
    let csv_path = find_irma_csv(root)?;
    let text = std::fs::read_to_string(&csv_path).map_err(|e| Error::io(&csv_path, e))?;
    let mut images: HashMap<String, PathBuf> = HashMap::new();
    for p in collect_images(root)? {
        if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
            images.insert(stem.to_string(), p);
        }
    }
    let mut samples = Vec::new();
    let mut problems = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let cols: Vec<&str> = line.trim().split(';').collect();
        if cols.len() < 2
            || (n == 0 && cols[0].eq_ignore_ascii_case("image_id"))
            || line.trim().is_empty()
        {
            continue;
        }
        let Some(category) = irma_category(cols[1]) else {
            problems.push(format!(
                "{} line {}: bad IRMA code {:?}",
                csv_path.display(),
                n + 1,
                cols[1]
            ));
            continue;
        };
        match images.get(cols[0].trim()) {
            Some(p) => samples.push(Sample {
                path: p.clone(),
                labels: vec![category - 1],
            }),
            None => problems.push(format!(
                "{} line {}: no image {}",
                csv_path.display(),
                n + 1,
                cols[0]
            )),
        }
    }
    Ok(Dataset {
        name: "irma".into(),
        labels: labels::irma15(),
        samples,
        problems,
    })
}

fn find_irma_csv(root: &Path) -> Result<PathBuf> {
    if root.is_file() {
        return Ok(root.to_path_buf());
    }
    let mut csvs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")))
        .collect();
    csvs.sort();
    csvs.into_iter().next().ok_or_else(|| {
        Error::InvalidArgument(format!("{}: no IRMA code file (*.csv)", root.display()))
    })
}

/// Train/test split of a data set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    /// The reference's: the first `train` samples to train, the last `test` to test.
    HeadTail { train: usize, test: usize },
    /// A seeded random split with this fraction for testing.
    Random { test_fraction: f64, seed: u64 },
}

impl std::str::FromStr for Split {
    type Err = String;
    /// `head:1200:400` or `random:0.2:SEED`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || format!("bad split {s:?} (head:TRAIN:TEST or random:FRACTION:SEED)");
        match parts.as_slice() {
            ["head", a, b] => Ok(Split::HeadTail {
                train: a.parse().map_err(|_| bad())?,
                test: b.parse().map_err(|_| bad())?,
            }),
            ["random", f, seed] => {
                let test_fraction: f64 = f.parse().map_err(|_| bad())?;
                if !(0.0..1.0).contains(&test_fraction) {
                    return Err(bad());
                }
                Ok(Split::Random {
                    test_fraction,
                    seed: seed.parse().map_err(|_| bad())?,
                })
            }
            _ => Err(bad()),
        }
    }
}

/// Splits into (train, test) sample lists.
pub fn split(samples: &[Sample], split: Split) -> Result<(Vec<Sample>, Vec<Sample>)> {
    match split {
        Split::HeadTail { train, test } => {
            if train + test > samples.len() {
                return Err(Error::InvalidArgument(format!(
                    "split head:{train}:{test} needs {} samples, the data set has {}",
                    train + test,
                    samples.len()
                )));
            }
            Ok((
                samples[..train].to_vec(),
                samples[samples.len() - test..].to_vec(),
            ))
        }
        Split::Random {
            test_fraction,
            seed,
        } => {
            let mut idx: Vec<usize> = (0..samples.len()).collect();
            shuffle(&mut idx, seed);
            let n_test = (samples.len() as f64 * test_fraction).round() as usize;
            let (test, train) = idx.split_at(n_test);
            let pick = |ix: &[usize]| {
                let mut ix = ix.to_vec();
                ix.sort_unstable();
                ix.into_iter()
                    .map(|i| samples[i].clone())
                    .collect::<Vec<_>>()
            };
            Ok((pick(train), pick(test)))
        }
    }
}

/// SplitMix64: a tiny seeded generator whose sequence is the same on every platform and version
/// (splits and training-data order must not change with a dependency update).
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Deterministic Fisher-Yates shuffle (SplitMix64), the same on every platform and version.
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed ^ 0x9E37_79B9_7F4A_7C15);
    for i in (1..items.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irma_codes_map_to_reference_categories() {
        assert_eq!(irma_category("1121-120-200-700"), Some(2));
        assert_eq!(irma_category("1121-127-500-000"), Some(5));
        assert_eq!(irma_category("1121-127-520-000"), Some(11));
        assert_eq!(irma_category("1121-127-560-000"), Some(15));
        assert_eq!(irma_category("1121-127-570-000"), Some(5));
        assert_eq!(irma_category("1121-110-914-700"), Some(9));
        assert_eq!(irma_category("1121-110-014-700"), None);
        assert_eq!(irma_category("1121-110-9x4-700"), None);
        assert_eq!(irma_category("1121-110-914"), None);
        assert_eq!(irma_category("11211-110-914-700"), None);
    }

    #[test]
    fn splits() {
        let s: Vec<Sample> = (0..10)
            .map(|i| Sample {
                path: format!("{i}").into(),
                labels: vec![i % 3],
            })
            .collect();
        let (tr, te) = split(&s, Split::HeadTail { train: 6, test: 3 }).unwrap();
        assert_eq!((tr.len(), te.len()), (6, 3));
        assert_eq!(te[0].path, PathBuf::from("7"));
        assert!(split(&s, Split::HeadTail { train: 8, test: 3 }).is_err());
        let (a, b) = split(
            &s,
            Split::Random {
                test_fraction: 0.3,
                seed: 1,
            },
        )
        .unwrap();
        let (c, d) = split(
            &s,
            Split::Random {
                test_fraction: 0.3,
                seed: 1,
            },
        )
        .unwrap();
        assert_eq!((a.len(), b.len()), (7, 3));
        assert_eq!((a, b), (c, d));
        assert_eq!(
            "head:1200:400".parse::<Split>().unwrap(),
            Split::HeadTail {
                train: 1200,
                test: 400
            }
        );
        assert!("random:1.5:3".parse::<Split>().is_err());
    }

    #[test]
    fn shuffle_is_a_permutation_and_seeded() {
        let mut a: Vec<u32> = (0..100).collect();
        let mut b = a.clone();
        shuffle(&mut a, 42);
        shuffle(&mut b, 42);
        assert_eq!(a, b);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_ne!(a, sorted);
    }
}
