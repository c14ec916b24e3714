//! Labelled image sets in their published layouts, shared by the trainer and `runtime eval`:
//!
//! - image folder: `ROOT/<label>/*.{png,jpg,jpeg,dcm,dicom}` (labels sorted by folder name);
//! - UNIFESP, Kaggle layout: `ROOT/train.csv` (`SOPInstanceUID,Target`, Target = space-separated
//!   label indices 0..21) and `ROOT/train/<Study>/<Series>/<SOPInstanceUID>-c.dcm`;
//! - UNIFESP, PNG repack (the one the reference experiment read): `ROOT/train_df.csv` with columns
//!   `SOPInstanceUID`, `Target`, `image_path` (more are ignored) and images at `ROOT/<image_path>`;
//! - IRMA (ImageCLEF 2009): a `;`-separated code file (`image_id;irma_code;...`) and `<image_id>.png`,
//!   grouped into 15 body-region categories of the anatomical axis ([`IrmaLabels::Regions`]), or
//!   labelled exactly as the reference experiment's code did ([`IrmaLabels::Reference`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::image::files::collect_images;
use crate::text::labels::{self, Label};

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
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum DatasetKind {
    /// ROOT/<label>/<images>: one folder per label (MedNIST's layout).
    Folder,
    /// UNIFESP: train.csv + DICOM tree (Kaggle), or train_df.csv + PNGs (the reference's repack).
    Unifesp,
    /// IRMA: a codes CSV and the PNGs beside it.
    Irma,
}

impl DatasetKind {
    /// The kind of a data set by the name it gives itself (`Dataset::name`, as bundle manifests
    /// record it): `unifesp`, `irma...`, `folder:PATH`.
    pub fn of_name(name: &str) -> Option<DatasetKind> {
        if name == "unifesp" {
            Some(DatasetKind::Unifesp)
        } else if name.starts_with("irma") {
            Some(DatasetKind::Irma)
        } else if name.starts_with("folder:") {
            Some(DatasetKind::Folder)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Folder => "folder",
            DatasetKind::Unifesp => "unifesp",
            DatasetKind::Irma => "irma",
        }
    }
}

/// How IRMA codes become labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum IrmaLabels {
    /// The body region of the anatomical axis: its first digit (1-9), and for the chest (5) its
    /// second digit (51-56 -> 10-15). What the IRMA code means.
    #[default]
    Regions,
    /// As the reference experiment's `Irma.py` computed them: after removing the dashes it reads
    /// characters 6..9 (the third directional digit and the first two anatomical ones); a code
    /// whose anatomical digit is 5 is "chest/heart", any other is named by the directional digit,
    /// and rows where that digit is 0 are dropped. Only for comparing with its published figures.
    Reference,
}

/// Options of the data set loaders.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub irma_labels: IrmaLabels,
    /// The IRMA codes file, when the folder holds several (`--codes`).
    pub codes: Option<PathBuf>,
}

/// Environment variable naming a folder that holds the data sets as `unifesp/`, `irma/`, ...
pub const DATA_ENV: &str = "XRAY_CLIP_DATA";

/// Where a data set is found when `--data` is not given: `$XRAY_CLIP_DATA/<name>`, else
/// `data/<name>` in the current folder.
pub fn default_data_dir(kind: DatasetKind) -> Result<PathBuf> {
    let name = kind.name();
    if kind == DatasetKind::Folder {
        return Err(Error::Dataset(
            "--dataset folder needs --data DIR (a folder with one sub-folder of images per label)"
                .into(),
        ));
    }
    let mut looked = Vec::new();
    if let Some(root) = std::env::var_os(DATA_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(root).join(name);
        if p.exists() {
            return Ok(p);
        }
        looked.push(format!("${DATA_ENV}/{name} = {}", p.display()));
    } else {
        looked.push(format!("${DATA_ENV} (not set)"));
    }
    let local = PathBuf::from("data").join(name);
    if local.exists() {
        return Ok(local);
    }
    looked.push(local.display().to_string());
    Err(Error::Dataset(format!(
        "no {name} data found (looked at {}): pass --data DIR, or set {DATA_ENV} to a folder holding {name}/ (layouts: README, \"Data sets\")",
        looked.join(", ")
    )))
}

pub fn load(kind: DatasetKind, root: &Path) -> Result<Dataset> {
    load_with(kind, root, &LoadOptions::default())
}

pub fn load_with(kind: DatasetKind, root: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let ds = match kind {
        DatasetKind::Folder => image_folder(root)?,
        DatasetKind::Unifesp => unifesp(root)?,
        DatasetKind::Irma => irma(root, opts)?,
    };
    if ds.samples.is_empty() {
        return Err(Error::Dataset(format!(
            "{}: the data set has no images",
            root.display()
        )));
    }
    Ok(ds)
}

/// `ROOT/<label>/...`: each visible sub-folder that holds images is a label (sorted by name);
/// hidden folders (`.ipynb_checkpoints`) and folders without images are not labels (reported).
pub fn image_folder(root: &Path) -> Result<Dataset> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !crate::image::files::is_hidden(p))
        .collect();
    dirs.sort();
    let mut labels = Vec::new();
    let mut samples = Vec::new();
    let mut problems = Vec::new();
    for d in &dirs {
        let name = d
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let images = collect_images(d)?;
        if images.is_empty() {
            problems.push(format!("{}: no images, not a label", d.display()));
            continue;
        }
        let i = labels.len();
        labels.push(Label::new(name.clone(), folder_display_name(&name)));
        samples.extend(images.into_iter().map(|path| Sample {
            path,
            labels: vec![i],
        }));
    }
    if labels.is_empty() {
        return Err(Error::Dataset(format!(
            "{}: no label folders with images (expected ROOT/<label>/<images>)",
            root.display()
        )));
    }
    Ok(Dataset {
        name: format!("folder:{}", root.display()),
        labels,
        samples,
        problems,
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

/// UNIFESP in either layout, told apart by its CSV (`train_df.csv`: PNG repack; `train.csv`: Kaggle).
pub fn unifesp(root: &Path) -> Result<Dataset> {
    let repack = root.join("train_df.csv");
    let kaggle = root.join("train.csv");
    if repack.is_file() {
        unifesp_rows(&repack, |row| {
            let rel = row.get("image_path")?;
            let rel = rel.trim().trim_start_matches("./");
            crate::fs::is_contained(rel).then(|| root.join(rel))
        })
    } else if kaggle.is_file() {
        // SOPInstanceUID -> file, from the DICOM tree.
        let mut files: HashMap<String, PathBuf> = HashMap::new();
        for p in collect_images(&root.join("train"))? {
            if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                files.insert(stem.trim_end_matches("-c").to_string(), p);
            }
        }
        unifesp_rows(&kaggle, |row| {
            files.get(row.get("SOPInstanceUID")?.trim()).cloned()
        })
    } else {
        Err(Error::Dataset(format!(
            "{}: not a UNIFESP folder (expected train_df.csv + images/ as the PNG repack, or train.csv + train/ as Kaggle's)",
            root.display()
        )))
    }
}

/// A CSV row by column name.
struct Row<'a> {
    header: &'a csv::StringRecord,
    record: &'a csv::StringRecord,
}

impl Row<'_> {
    fn get(&self, column: &str) -> Option<&str> {
        let i = self.header.iter().position(|h| h.trim() == column)?;
        self.record.get(i)
    }
}

/// Rows of a UNIFESP CSV (`SOPInstanceUID`, `Target` = space-separated class ids with the
/// original's trailing space, CRLF or LF) in file order; `file` finds a row's image.
fn unifesp_rows(csv_path: &Path, file: impl Fn(&Row) -> Option<PathBuf>) -> Result<Dataset> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(csv_path)
        .map_err(|e| csv_error(csv_path, e))?;
    let header = reader
        .headers()
        .map_err(|e| csv_error(csv_path, e))?
        .clone();
    for needed in ["SOPInstanceUID", "Target"] {
        if !header.iter().any(|h| h.trim() == needed) {
            return Err(Error::Dataset(format!(
                "{}: no {needed} column",
                csv_path.display()
            )));
        }
    }
    let name = csv_path.file_name().unwrap_or_default().to_string_lossy();
    let mut samples = Vec::new();
    let mut problems = Vec::new();
    for (n, record) in reader.records().enumerate() {
        let line = n + 2;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{name} line {line}: {e}"));
                continue;
            }
        };
        let row = Row {
            header: &header,
            record: &record,
        };
        let (Some(uid), Some(target)) = (row.get("SOPInstanceUID"), row.get("Target")) else {
            problems.push(format!("{name} line {line}: missing columns"));
            continue;
        };
        let parsed: std::result::Result<Vec<usize>, _> =
            target.split_whitespace().map(str::parse::<usize>).collect();
        let labels = match parsed {
            Ok(l) if !l.is_empty() && l.iter().all(|&i| i < labels::UNIFESP_NAMES.len()) => l,
            _ => {
                problems.push(format!("{name} line {line}: bad target {target:?}"));
                continue;
            }
        };
        match file(&row) {
            Some(path) if path.is_file() => samples.push(Sample { path, labels }),
            _ => problems.push(format!("{name} line {line}: no file for {}", uid.trim())),
        }
    }
    Ok(Dataset {
        name: "unifesp".into(),
        labels: labels::unifesp(),
        samples,
        problems,
    })
}

fn csv_error(path: &Path, e: csv::Error) -> Error {
    Error::Decode {
        path: path.to_path_buf(),
        format: "CSV",
        reason: e.to_string(),
    }
}

/// The four axes of an IRMA code `TTTT-DDD-AAA-BBB`; each character is base 36 (0-9, a-z).
fn irma_axes(code: &str) -> Option<[&str; 4]> {
    let parts: Vec<&str> = code.trim().split('-').collect();
    let axes: [&str; 4] = parts.try_into().ok()?;
    if axes.iter().map(|p| p.len()).ne([4, 3, 3, 3])
        || !axes
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_alphanumeric()))
    {
        return None;
    }
    Some(axes)
}

/// Body-region category (1..=15) of a code: the first digit of the anatomical axis (1..9); chest
/// codes `51x`..`56x` become the second-level chest categories 10..15. Only those two characters
/// are read, so letters elsewhere (`1121-120-91a-700`) are fine.
pub fn irma_category(code: &str) -> Option<usize> {
    let a = irma_axes(code)?[2].as_bytes();
    let digit = |b: u8| (b as char).to_digit(10);
    match digit(a[0])? {
        5 => match a[1] {
            b'1'..=b'6' => Some(9 + digit(a[1])? as usize),
            b'0' | b'7'..=b'9' => Some(5),
            _ => None,
        },
        first @ 1..=9 => Some(first as usize),
        _ => None,
    }
}

/// The category (1..=15) the reference experiment's `Irma.py` gave a code, or `None` where it
/// gave "Unknown" (and dropped the row): characters [6:9] of the code without dashes are the third
/// directional and the first two anatomical characters; a directional digit 1-9 with anatomical 5
/// is "chest/heart" (14), with anything else the category of the directional digit.
pub fn irma_reference_category(code: &str) -> Option<usize> {
    let axes = irma_axes(code)?;
    let direction = axes[1].as_bytes()[2];
    let anatomy = axes[2].as_bytes()[0];
    match direction {
        b'1'..=b'9' if anatomy == b'5' => Some(14),
        b'1'..=b'9' => Some((direction - b'0') as usize),
        _ => None,
    }
}

pub fn irma(root: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let (csv_path, image_root) = find_irma_csv(root, opts.codes.as_deref())?;
    let text = std::fs::read_to_string(&csv_path).map_err(|e| Error::io(&csv_path, e))?;
    let mut images: HashMap<String, PathBuf> = HashMap::new();
    for p in collect_images(&image_root)? {
        if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
            images.insert(stem.to_string(), p);
        }
    }
    let mut samples = Vec::new();
    let mut problems = Vec::new();
    let mut unlabelled = 0usize;
    for (n, line) in text.lines().enumerate() {
        let cols: Vec<&str> = line.trim().split(';').collect();
        if cols.len() < 2
            || (n == 0 && cols[0].eq_ignore_ascii_case("image_id"))
            || line.trim().is_empty()
        {
            continue;
        }
        let category = match opts.irma_labels {
            IrmaLabels::Regions => irma_category(cols[1]),
            IrmaLabels::Reference if irma_axes(cols[1]).is_some() => {
                match irma_reference_category(cols[1]) {
                    Some(c) => Some(c),
                    None => {
                        unlabelled += 1;
                        continue;
                    }
                }
            }
            IrmaLabels::Reference => None,
        };
        let Some(category) = category else {
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
    if unlabelled > 0 {
        problems.push(format!(
            "{unlabelled} rows have no reference label (third directional digit not 1-9) and are left out, as the reference did"
        ));
    }
    let (name, labels) = match opts.irma_labels {
        IrmaLabels::Regions => ("irma", labels::irma15()),
        IrmaLabels::Reference => ("irma (reference labels)", labels::irma_reference()),
    };
    Ok(Dataset {
        name: name.into(),
        labels,
        samples,
        problems,
    })
}

/// The codes file and the folder its images are searched in: `--codes FILE`; a CSV given as
/// `--data` (images beside it); or the folder's training codes file (`*train*.csv` when it holds
/// several, as the Kaggle copy with both the train and the test codes does).
fn find_irma_csv(root: &Path, codes: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    if let Some(c) = codes {
        if !c.is_file() {
            return Err(Error::Dataset(format!(
                "--codes {}: no such file",
                c.display()
            )));
        }
        let images = if root.is_file() {
            crate::fs::parent_of(root).to_path_buf()
        } else {
            root.to_path_buf()
        };
        return Ok((c.to_path_buf(), images));
    }
    if root.is_file() {
        return Ok((root.to_path_buf(), crate::fs::parent_of(root).to_path_buf()));
    }
    let mut csvs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv")))
        .collect();
    csvs.sort();
    let lower = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default()
    };
    let chosen = match csvs.len() {
        0 => None,
        1 => csvs.first().cloned(),
        _ => {
            let train: Vec<&PathBuf> = csvs
                .iter()
                .filter(|p| lower(p).contains("train") && !lower(p).contains("test"))
                .collect();
            match train.as_slice() {
                [one] => Some((*one).clone()),
                _ => {
                    return Err(Error::Dataset(format!(
                        "{}: several IRMA code files ({}); pick one with --codes FILE",
                        root.display(),
                        csvs.iter().map(lower).collect::<Vec<_>>().join(", ")
                    )))
                }
            }
        }
    };
    let csv = chosen.ok_or_else(|| {
        Error::Dataset(format!(
            "{}: no IRMA code file (*.csv; give the file as --data or --codes)",
            root.display()
        ))
    })?;
    Ok((csv, root.to_path_buf()))
}

/// Train/test split of a data set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    /// The reference's: the first `train` samples to train, the last `test` to test.
    HeadTail { train: usize, test: usize },
    /// The reference experiment's UNIFESP split, exactly as its code made it: rows with several
    /// labels dropped (file order kept), then rows [1, 1200) to train and [1200, 1600) to test.
    Reference,
    /// A seeded random split with this fraction for testing.
    Random { test_fraction: f64, seed: u64 },
}

impl std::str::FromStr for Split {
    type Err = String;
    /// `head:1200:400` or `random:0.2:SEED`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad =
            || format!("bad split {s:?} (reference, head:TRAIN:TEST or random:FRACTION:SEED)");
        match parts.as_slice() {
            ["reference"] => Ok(Split::Reference),
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

impl std::fmt::Display for Split {
    /// The form `FromStr` reads back (recorded in bundle manifests).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Split::Reference => write!(f, "reference"),
            Split::HeadTail { train, test } => write!(f, "head:{train}:{test}"),
            Split::Random {
                test_fraction,
                seed,
            } => write!(f, "random:{test_fraction}:{seed}"),
        }
    }
}

impl Split {
    /// The split a data set is divided by when none is given (and the model records none): the
    /// first 1200 and last 400 images for UNIFESP, a seeded 80/20 random split otherwise.
    pub fn default_for(kind: DatasetKind, seed: u64) -> Split {
        match kind {
            DatasetKind::Unifesp => Split::HeadTail {
                train: 1200,
                test: 400,
            },
            _ => Split::Random {
                test_fraction: 0.2,
                seed,
            },
        }
    }
}

/// Splits into (train, test) sample lists.
pub fn split(samples: &[Sample], split: Split) -> Result<(Vec<Sample>, Vec<Sample>)> {
    match split {
        Split::Reference => {
            let single: Vec<Sample> = samples
                .iter()
                .filter(|s| s.labels.len() == 1)
                .cloned()
                .collect();
            if single.len() < 1600 {
                return Err(Error::Dataset(format!(
                    "split reference needs 1600 single-label rows, the data set has {}",
                    single.len()
                )));
            }
            Ok((single[1..1200].to_vec(), single[1200..1600].to_vec()))
        }
        Split::HeadTail { train, test } => {
            if train + test > samples.len() {
                return Err(Error::Dataset(format!(
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

/// The validation rows held out of a split's training rows (`trainer finetune --val FRACTION`,
/// seeded): (rows trained on, validation rows). The trainer and `runtime eval --split val` both
/// call this, so they name the same images.
pub fn validation_split(
    train: &[Sample],
    fraction: f64,
    seed: u64,
) -> Result<(Vec<Sample>, Vec<Sample>)> {
    split(
        train,
        Split::Random {
            test_fraction: fraction,
            seed,
        },
    )
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
        assert_eq!(irma_category("1121-110-9x4-700"), Some(9));
        assert_eq!(irma_category("1121-120-91a-700"), Some(9));
        assert_eq!(irma_category("1121-120-5x0-700"), None);
        assert_eq!(irma_category("1121-110-x14-700"), None);
        assert_eq!(irma_category("1121-1_0-914-700"), None);
        assert_eq!(irma_category("1121-110-914"), None);
        assert_eq!(irma_category("11211-110-914-700"), None);
    }

    #[test]
    fn irma_reference_labels_follow_its_code() {
        // Irma.py: code.replace("-", "")[6:9] = (3rd directional, 1st and 2nd anatomical).
        assert_eq!(irma_reference_category("1121-127-520-000"), Some(14)); // anatomy 5 -> chest/heart
        assert_eq!(irma_reference_category("1121-127-700-000"), Some(7)); // named by direction 7
        assert_eq!(irma_reference_category("1121-120-200-700"), None); // direction 0: dropped
        assert_eq!(irma_reference_category("1121-12a-200-700"), None);
        assert_eq!(irma_reference_category("1121-123-91a-700"), Some(3));
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
        // The reference's split: multi-label rows out, rows [1, 1200) and [1200, 1600) of the rest.
        let rows: Vec<Sample> = (0..1700)
            .map(|i| Sample {
                path: format!("{i}").into(),
                labels: if i % 17 == 5 {
                    vec![3, 4]
                } else {
                    vec![i % 22]
                },
            })
            .collect();
        let single: Vec<&Sample> = rows.iter().filter(|s| s.labels.len() == 1).collect();
        let (tr, te) = split(&rows, "reference".parse().unwrap()).unwrap();
        assert_eq!((tr.len(), te.len()), (1199, 400));
        assert_eq!(tr[0].path, single[1].path, "row 0 is unused");
        assert_eq!(te[0].path, single[1200].path);
        assert_eq!(te[399].path, single[1599].path);
        assert!(tr.iter().chain(&te).all(|s| s.labels.len() == 1));
        assert!(split(&rows[..1500], Split::Reference).is_err());
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
