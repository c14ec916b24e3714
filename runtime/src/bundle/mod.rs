//! Model bundle, format 1: a folder with `manifest.json`, the ONNX encoders, label embeddings,
//! tokenizer and an HF-style `preprocessor_config.json`. See `models/README.md`.
//!
//! Loading checks everything it can before a model runs: format version, that every file stays inside
//! the bundle folder, sha256 of every file, embedding shapes and label counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::calibration::{RejectRule, RejectScore};
use crate::error::{Error, Result};
use crate::fs::{self, is_contained};
use crate::image::preprocess::PreprocessConfig;
use crate::scoring::normalize_rows;
use crate::text::labels::Label;

#[cfg(feature = "onnx")]
pub mod assemble;
#[cfg(feature = "onnx")]
pub mod calibrate;
#[cfg(feature = "onnx")]
pub mod ensemble;
#[cfg(feature = "onnx")]
pub mod import;
pub mod npy;
pub mod quantization;
#[cfg(feature = "onnx")]
pub mod quantize;
pub mod self_check;
mod write;

pub use write::{
    copy_into, folder_name, hf_preprocessor_config, write_copy, BundleWriter, CopiedFile,
};

pub const FORMAT_VERSION: u32 = 1;
/// The format of a bundle with a `calibration` (a temperature and an "unknown" rule): version 2,
/// so that a runtime that would ignore the rule refuses the bundle instead. Version 1 still loads.
pub const CALIBRATED_FORMAT_VERSION: u32 = 2;
/// The format of a bundle whose "unknown" rule is on the class centroids (file `class_centroids`):
/// version 3, so that a version-2 runtime, which would read the threshold as a probability,
/// refuses it. Versions 1 and 2 still load.
pub const CENTROID_FORMAT_VERSION: u32 = 3;
/// The newest format this runtime reads.
pub const NEWEST_FORMAT_VERSION: u32 = CENTROID_FORMAT_VERSION;
pub const MANIFEST: &str = "manifest.json";

/// File roles a bundle can hold.
pub const IMAGE_ENCODER: &str = "image_encoder";
pub const TEXT_ENCODER: &str = "text_encoder";
pub const LABEL_EMBEDDINGS: &str = "label_embeddings";
pub const TOKENIZER: &str = "tokenizer";
pub const PREPROCESSOR_CONFIG: &str = "preprocessor_config";
/// `[labels x embedding_dim]` float32 `.npy`: each label's mean image embedding (the centroid
/// "unknown" rule of a calibrated bundle).
pub const CLASS_CENTROIDS: &str = "class_centroids";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Path relative to the bundle folder.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    /// Graph input name (ONNX files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<String>,
    /// Graph output name (ONNX files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

/// One label of the bundle's label set, with the prompt(s) its embedding was computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleLabel {
    #[serde(flatten)]
    pub label: Label,
    pub prompts: Vec<String>,
}

impl BundleLabel {
    /// The labels with the prompts that `templates` make of them.
    pub fn fill_all(labels: &[Label], templates: &[String]) -> Result<Vec<BundleLabel>> {
        labels
            .iter()
            .map(|l| {
                let prompts = templates
                    .iter()
                    .map(|t| crate::text::prompts::fill(t, l))
                    .collect::<Result<_>>()?;
                Ok(BundleLabel {
                    label: l.clone(),
                    prompts,
                })
            })
            .collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// Where the starting weights came from (e.g. `openai/clip-vit-base-patch32`, `random init`).
    pub base_weights: String,
    #[serde(default)]
    pub dataset: String,
    /// How the data set was divided (`reference`, `head:TRAIN:TEST`, `random:FRACTION:SEED`):
    /// `runtime eval` on the same data set scores this split's test part by default.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub split: String,
    /// Training settings, free-form (learning rate, epochs, ...).
    #[serde(default)]
    pub training: serde_json::Value,
    /// Final metrics of the run, free-form (e.g. `{"mednist_test_top1": 0.97}`).
    #[serde(default)]
    pub metrics: serde_json::Value,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub license: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub notes: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub labels: Vec<BundleLabel>,
    /// Templates used for the label embeddings (several are averaged after normalising).
    pub templates: Vec<String>,
    pub embedding_dim: usize,
    pub logit_scale: f32,
    /// Whether the image encoder's output is already L2-normalised (the runtime normalises either way).
    #[serde(default)]
    pub image_embeds_normalized: bool,
    pub preprocessing: PreprocessConfig,
    /// Files by role (`image_encoder`, `text_encoder`, `label_embeddings`, `tokenizer`, `preprocessor_config`).
    pub files: BTreeMap<String, FileEntry>,
    pub provenance: Provenance,
    /// Set for an int8 bundle (`runtime quantize`): how it was made and checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<quantization::Quantization>,
    /// Fixed inputs and the image embeddings written with the bundle (file role `self_check`);
    /// absent in bundles written before it existed, which then load unchecked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_check: Option<self_check::SelfCheck>,
    /// A temperature for the label probabilities and an "unknown" rule (`runtime calibrate`);
    /// format version 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<crate::calibration::Calibration>,
}

impl Manifest {
    /// The scale of the label logits for probabilities: `logit_scale`, divided by the calibrated
    /// temperature when there is one.
    pub fn calibrated_logit_scale(&self) -> f32 {
        self.logit_scale / self.calibration.as_ref().map_or(1.0, |c| c.temperature)
    }

    /// The format version a manifest with this calibration needs.
    pub fn needed_format_version(&self) -> u32 {
        match &self.calibration {
            None => FORMAT_VERSION,
            Some(c) if c.reject_score == RejectScore::Centroid => CENTROID_FORMAT_VERSION,
            Some(_) => CALIBRATED_FORMAT_VERSION,
        }
    }
}

/// Files of a bundle compiled into a binary: (path inside the bundle, bytes).
pub type EmbeddedFiles = &'static [(&'static str, &'static [u8])];

/// A verified bundle: a folder on disk, or one compiled into the binary.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The folder (for an embedded bundle, a name for messages: `<built-in name>`).
    pub dir: PathBuf,
    /// Set for a bundle compiled into the binary: its files come from here, not from `dir`.
    pub embedded: Option<EmbeddedFiles>,
    pub manifest: Manifest,
    /// `[labels x embedding_dim]`, each row L2-normalised.
    pub label_embeddings: Vec<f32>,
    /// `[labels x embedding_dim]`, each row L2-normalised: the class centroids of a calibrated
    /// bundle's "unknown" rule (file `class_centroids`), when it has them.
    pub class_centroids: Option<Vec<f32>>,
}

impl Bundle {
    /// Loads and verifies a bundle folder.
    pub fn load(dir: &Path) -> Result<Bundle> {
        let manifest_path = dir.join(MANIFEST);
        if !dir.is_dir() {
            return Err(Error::bundle(dir, "is not a folder"));
        }
        // What the trainer writes (or an HF weights folder), handed over where a bundle is expected.
        if !manifest_path.exists() {
            let what = if fs::OutputKind::Run.is_in(dir) {
                Some("a training run")
            } else if dir.join("model.safetensors").is_file() {
                Some("a training checkpoint")
            } else {
                None
            };
            if let Some(what) = what {
                return Err(Error::bundle(
                    dir,
                    format!(
                        "is {what}, not a bundle: export it first (trainer export --model {} --labels SET --out models/NAME)",
                        dir.display()
                    ),
                ));
            }
        }
        let text = std::fs::read(&manifest_path).map_err(|e| Error::io(&manifest_path, e))?;
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|cause| Error::Json {
            path: manifest_path.clone(),
            cause,
        })?;
        Self::from_manifest(dir, manifest, |path| std::fs::read(path))
    }

    /// Loads and verifies a bundle compiled into the binary, as [`Bundle::load`] does a folder (the
    /// ONNX files are hashed when the engine loads them).
    pub fn from_embedded(files: EmbeddedFiles) -> Result<Bundle> {
        let not_built_in = |name: &str| {
            Error::io(
                name,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not built in"),
            )
        };
        let manifest_bytes =
            embedded_file(files, MANIFEST).ok_or_else(|| not_built_in(MANIFEST))?;
        let manifest: Manifest =
            serde_json::from_slice(manifest_bytes).map_err(|cause| Error::Json {
                path: PathBuf::from("<built-in>").join(MANIFEST),
                cause,
            })?;
        let dir = PathBuf::from(format!("<built-in {}>", manifest.name));
        let mut b = Self::from_manifest(&dir, manifest, |path| {
            let name = path.strip_prefix(&dir).unwrap_or(path).to_string_lossy();
            embedded_file(files, &name)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "not built in"))
        })?;
        b.embedded = Some(files);
        Ok(b)
    }

    /// Verifies a manifest against files fetched by `read` (a path inside `dir`): the browser demo
    /// hands in files the user picked, the native loader reads the disk.
    pub fn from_manifest(
        dir: &Path,
        manifest: Manifest,
        mut read: impl FnMut(&Path) -> std::io::Result<Vec<u8>>,
    ) -> Result<Bundle> {
        manifest.validate(dir)?;
        for (role, entry) in &manifest.files {
            // ONNX files are hashed when the engine loads them (no second read of a large file);
            // the label embeddings just below.
            if matches!(
                role.as_str(),
                IMAGE_ENCODER | TEXT_ENCODER | LABEL_EMBEDDINGS
            ) {
                continue;
            }
            let path = dir.join(&entry.path);
            let bytes = read(&path).map_err(|e| Error::io(&path, e))?;
            verify_bytes(dir, &entry.path, entry, &bytes)?;
        }
        let emb_entry = &manifest.files[LABEL_EMBEDDINGS];
        let emb_path = dir.join(&emb_entry.path);
        let bytes = read(&emb_path).map_err(|e| Error::io(&emb_path, e))?;
        let mut bundle = Self::from_label_embeddings(dir, manifest, &bytes)?;
        if let Some(entry) = bundle.manifest.files.get(CLASS_CENTROIDS) {
            let path = dir.join(&entry.path);
            let bytes = read(&path).map_err(|e| Error::io(&path, e))?;
            bundle.set_class_centroids(&bytes)?;
        }
        Ok(bundle)
    }

    /// Takes the bytes of the `class_centroids` file (checked against the manifest: hash, shape).
    pub fn set_class_centroids(&mut self, npy_bytes: &[u8]) -> Result<()> {
        let dir = &self.dir;
        let entry = self
            .manifest
            .files
            .get(CLASS_CENTROIDS)
            .ok_or_else(|| Error::bundle(dir, "lists no class_centroids file"))?;
        verify_bytes(dir, &entry.path, entry, npy_bytes)?;
        let (shape, data) = npy::from_bytes(npy_bytes, &dir.join(&entry.path))?;
        let (labels, dim) = (self.manifest.labels.len(), self.manifest.embedding_dim);
        if shape != [labels, dim] {
            return Err(Error::bundle(
                dir,
                format!("class centroids have shape {shape:?}, manifest has {labels} labels x {dim} dims"),
            ));
        }
        self.class_centroids = Some(normalize_rows(&data, dim));
        Ok(())
    }

    /// The "unknown" rule of a calibrated bundle, ready to apply to its own labels' probabilities
    /// at [`Manifest::calibrated_logit_scale`] (none: every image is answered).
    pub fn reject_rule(&self) -> Option<RejectRule> {
        let c = self.manifest.calibration.as_ref()?;
        let below = c.reject_below?;
        let centroids = match c.reject_score {
            RejectScore::Probability => &[][..],
            // Loading refuses a centroid rule without its file; an empty list rejects all.
            RejectScore::Centroid => self.class_centroids.as_deref().unwrap_or(&[]),
        };
        Some(RejectRule::new(
            c.reject_score,
            below,
            centroids,
            self.manifest.embedding_dim,
        ))
    }

    /// A bundle from its manifest and label embeddings alone (their hash, shape and count checked);
    /// the browser demo fetches and checks the other files itself.
    pub fn from_label_embeddings(
        dir: &Path,
        manifest: Manifest,
        npy_bytes: &[u8],
    ) -> Result<Bundle> {
        manifest.validate(dir)?;
        let emb_entry = &manifest.files[LABEL_EMBEDDINGS];
        verify_bytes(dir, &emb_entry.path, emb_entry, npy_bytes)?;
        let (shape, data) = npy::from_bytes(npy_bytes, &dir.join(&emb_entry.path))?;
        if shape != [manifest.labels.len(), manifest.embedding_dim] {
            return Err(Error::bundle(
                dir,
                format!(
                    "label embeddings have shape {shape:?}, manifest has {} labels x {} dims",
                    manifest.labels.len(),
                    manifest.embedding_dim
                ),
            ));
        }
        let label_embeddings = normalize_rows(&data, manifest.embedding_dim);
        Ok(Bundle {
            dir: dir.to_path_buf(),
            embedded: None,
            manifest,
            label_embeddings,
            class_centroids: None,
        })
    }

    pub fn has_text_encoder(&self) -> bool {
        self.manifest.files.contains_key(TEXT_ENCODER)
    }

    pub fn file_path(&self, role: &str) -> Option<PathBuf> {
        self.manifest
            .files
            .get(role)
            .map(|e| self.dir.join(&e.path))
    }

    /// Reads a file of the bundle and checks its hash.
    pub fn read_verified(&self, role: &str) -> Result<Vec<u8>> {
        let entry = self
            .manifest
            .files
            .get(role)
            .ok_or_else(|| Error::bundle(&self.dir, format!("has no {role}")))?;
        let path = self.dir.join(&entry.path);
        let bytes = match self.embedded {
            Some(files) => embedded_file(files, &entry.path)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| {
                    Error::bundle(&self.dir, format!("{} is not built in", entry.path))
                })?,
            None => std::fs::read(&path).map_err(|e| Error::io(&path, e))?,
        };
        verify_bytes(&self.dir, &entry.path, entry, &bytes)?;
        Ok(bytes)
    }

    pub fn labels(&self) -> Vec<&Label> {
        self.manifest.labels.iter().map(|l| &l.label).collect()
    }
}

/// The bytes of one built-in bundle file.
fn embedded_file(files: EmbeddedFiles, name: &str) -> Option<&'static [u8]> {
    files.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

pub fn verify_bytes(dir: &Path, name: &str, entry: &FileEntry, bytes: &[u8]) -> Result<()> {
    if bytes.len() as u64 != entry.bytes {
        return Err(Error::bundle(
            dir,
            format!(
                "file {name} has {} bytes, manifest says {}",
                bytes.len(),
                entry.bytes
            ),
        ));
    }
    let actual = fs::sha256_hex(bytes);
    if actual != entry.sha256 {
        return Err(Error::HashMismatch {
            bundle: dir.to_path_buf(),
            file: name.to_string(),
            expected: entry.sha256.clone(),
            actual,
        });
    }
    Ok(())
}

impl Manifest {
    pub fn validate(&self, dir: &Path) -> Result<()> {
        let fail = |reason: String| Err(Error::bundle(dir, reason));
        if !(FORMAT_VERSION..=NEWEST_FORMAT_VERSION).contains(&self.format_version) {
            return fail(format!(
                "format version {} is not supported (this runtime reads versions {FORMAT_VERSION} to {NEWEST_FORMAT_VERSION})",
                self.format_version
            ));
        }
        if let Some(c) = &self.calibration {
            let needed = self.needed_format_version();
            if self.format_version < needed {
                return fail(format!(
                    "its calibration needs format version {needed}, not {}",
                    self.format_version
                ));
            }
            if !(c.temperature.is_finite() && c.temperature > 0.0) {
                return fail(format!(
                    "calibration temperature {} is not positive",
                    c.temperature
                ));
            }
            let range = match c.reject_score {
                RejectScore::Probability => 0.0..=1.0,
                RejectScore::Centroid => -1.0..=1.0,
            };
            if c.reject_below.is_some_and(|t| !range.contains(&t)) {
                return fail(format!(
                    "calibration reject_below is not a {} (in {range:?})",
                    c.reject_score.name()
                ));
            }
            if c.reject_below.is_some()
                && c.reject_score == RejectScore::Centroid
                && !self.files.contains_key(CLASS_CENTROIDS)
            {
                return fail("its unknown rule needs the class_centroids file, which the manifest does not list".into());
            }
        }
        if self.labels.is_empty() {
            return fail("manifest has no labels".into());
        }
        if self.embedding_dim == 0 {
            return fail("embedding_dim is 0".into());
        }
        if !(self.logit_scale.is_finite() && self.logit_scale > 0.0) {
            return fail(format!(
                "logit_scale {} must be a positive number",
                self.logit_scale
            ));
        }
        self.preprocessing
            .validate()
            .or_else(|e| fail(format!("preprocessing: {e}")))?;
        for (role, entry) in &self.files {
            if !is_contained(&entry.path) {
                return fail(format!(
                    "file {role} has path {:?}, which leaves the bundle folder",
                    entry.path
                ));
            }
            if entry.sha256.len() != 64 || !entry.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return fail(format!("file {role} has no valid sha256"));
            }
        }
        for role in [IMAGE_ENCODER, LABEL_EMBEDDINGS] {
            if !self.files.contains_key(role) {
                return fail(format!("manifest lists no {role} file"));
            }
        }
        if self.files.contains_key(TEXT_ENCODER) && !self.files.contains_key(TOKENIZER) {
            return fail("a text encoder needs a tokenizer file".into());
        }
        Ok(())
    }

    /// Adds or replaces a file entry, hashing the bytes that were written.
    pub fn set_file(&mut self, role: &str, path: &str, bytes: &[u8], io: Option<(&str, &str)>) {
        self.files.insert(
            role.to_string(),
            FileEntry {
                path: path.to_string(),
                sha256: fs::sha256_hex(bytes),
                bytes: bytes.len() as u64,
                input: io.map(|(i, _)| i.to_string()),
                output: io.map(|(_, o)| o.to_string()),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containment() {
        assert!(is_contained("image_encoder.onnx"));
        assert!(is_contained("sub/x.onnx"));
        assert!(!is_contained("../x.onnx"));
        assert!(!is_contained("a/../../x"));
        assert!(!is_contained("/etc/passwd"));
        assert!(!is_contained(""));
        assert!(!is_contained("..\\x"));
    }
}
