//! Writing a bundle: staged in a hidden sibling folder, verified, renamed into place.

use std::path::Path;

use super::{npy, Bundle, Manifest, LABEL_EMBEDDINGS, MANIFEST, PREPROCESSOR_CONFIG};
use crate::error::{Error, Result};
use crate::fs::{self, is_contained};
use crate::image::preprocess::{Crop, PreprocessConfig};
use crate::scoring::normalize_rows;

/// HF `preprocessor_config.json` for the same preprocessing, so HF tools read the bundle too.
pub fn hf_preprocessor_config(cfg: &PreprocessConfig) -> serde_json::Value {
    let (size, center_crop) = match cfg.crop {
        Crop::Center => (
            serde_json::json!({"shortest_edge": cfg.resize_shortest_edge}),
            true,
        ),
        Crop::None => (
            serde_json::json!({"height": cfg.image_size, "width": cfg.image_size}),
            false,
        ),
    };
    serde_json::json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true,
        "size": size,
        "resample": 3,
        "do_center_crop": center_crop,
        "crop_size": {"height": cfg.image_size, "width": cfg.image_size},
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": cfg.mean,
        "image_std": cfg.std,
        "do_convert_rgb": true
    })
}

/// Writes a bundle folder atomically: everything goes to a hidden sibling folder that is verified
/// and then renamed into place, so a crash never leaves a bundle that loads but is wrong.
pub struct BundleWriter {
    staged: fs::StagedDir,
    pub manifest: Manifest,
}

/// A bundle name usable as a folder name (letters, digits, `.`, `-`, `_`; others become `-`).
pub fn folder_name(name: &str) -> String {
    let s: String = name
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches(['-', '.']).to_string();
    if s.is_empty() {
        "bundle".into()
    } else {
        s
    }
}

/// Where a file of a copied bundle comes from (see [`write_copy`]).
pub enum CopiedFile<'a> {
    /// As the source bundle has it (verified).
    Same,
    /// These bytes instead.
    Bytes(&'a [u8]),
    /// Left out.
    Drop,
}

/// Writes a new bundle at `out` from `src`'s files (each as `source(role)` says) under `manifest`
/// (its file list is rebuilt from what is written).
pub fn write_copy<'a>(
    src: &Bundle,
    manifest: Manifest,
    out: &Path,
    force: bool,
    source: impl Fn(&str) -> CopiedFile<'a>,
) -> Result<Bundle> {
    copy_into(src, manifest, out, force, source)?.finish()
}

/// As [`write_copy`], but unfinished: the caller adds files of its own, then finishes.
pub fn copy_into<'a>(
    src: &Bundle,
    mut manifest: Manifest,
    out: &Path,
    force: bool,
    source: impl Fn(&str) -> CopiedFile<'a>,
) -> Result<BundleWriter> {
    manifest.files.clear();
    let mut w = BundleWriter::create(out, manifest, force)?;
    for (role, entry) in &src.manifest.files {
        let bytes = match source(role) {
            CopiedFile::Same => src.read_verified(role)?,
            CopiedFile::Bytes(b) => b.to_vec(),
            CopiedFile::Drop => continue,
        };
        let io = entry.input.as_deref().zip(entry.output.as_deref());
        w.add_file(role, &entry.path, &bytes, io)?;
    }
    Ok(w)
}

impl BundleWriter {
    /// Starts a bundle for `--out requested` by the rule of [`fs::resolve_output`]: a missing
    /// or empty folder becomes the bundle, an existing bundle is replaced only with `force`, any
    /// other folder gets the bundle as a sub-folder named after the manifest's name.
    pub fn create(requested: &Path, manifest: Manifest, force: bool) -> Result<BundleWriter> {
        let target = fs::resolve_output(
            requested,
            fs::OutputKind::Bundle,
            || folder_name(&manifest.name),
            force,
        )?;
        Ok(BundleWriter {
            staged: fs::StagedDir::new(&target)?,
            manifest,
        })
    }

    /// The folder the bundle will have once finished.
    pub fn target(&self) -> &Path {
        self.staged.target()
    }

    /// Writes one file of the bundle and records it in the manifest.
    pub fn add_file(
        &mut self,
        role: &str,
        name: &str,
        bytes: &[u8],
        io: Option<(&str, &str)>,
    ) -> Result<()> {
        if !is_contained(name) {
            return Err(Error::BadPath(format!(
                "bundle file name {name:?} leaves the bundle folder"
            )));
        }
        let path = self.staged.path().join(name);
        std::fs::create_dir_all(fs::parent_of(&path))
            .map_err(|e| Error::io(self.staged.path(), e))?;
        fs::write_atomic(&path, bytes)?;
        self.manifest.set_file(role, name, bytes, io);
        Ok(())
    }

    pub fn add_label_embeddings(&mut self, embeddings: &[f32]) -> Result<()> {
        let dim = self.manifest.embedding_dim;
        let rows = self.manifest.labels.len();
        if embeddings.len() != rows * dim {
            return Err(Error::Shape {
                what: "label embeddings".into(),
                expected: format!("{rows} x {dim}"),
                actual: format!("{} values", embeddings.len()),
            });
        }
        let normalized = normalize_rows(embeddings, dim);
        self.add_file(
            LABEL_EMBEDDINGS,
            "label_embeddings.npy",
            &npy::to_bytes(&[rows, dim], &normalized),
            None,
        )
    }

    /// The self-check's expected embeddings: the staged image encoder, on the CPU, run on the
    /// fixed inputs (`bundle::self_check`). Without the `onnx` feature bundles are written
    /// without one.
    #[cfg(feature = "onnx")]
    fn add_self_check(&mut self) -> Result<()> {
        use super::self_check::{self, SelfCheck, SELF_CHECK, SELF_CHECK_FILE};
        let Some(entry) = self.manifest.files.get(super::IMAGE_ENCODER).cloned() else {
            return Ok(());
        };
        let path = self.staged.path().join(&entry.path);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let opts = crate::engine::EngineOptions {
            device: crate::engine::Device::Cpu,
            threads: 0,
        };
        let mut encoder = crate::engine::Encoder::from_bytes(
            &bytes,
            &path.display().to_string(),
            &opts,
            (entry.input.as_deref(), entry.output.as_deref()),
        )?;
        let check = SelfCheck::v1();
        let size = self.manifest.preprocessing.image_size as usize;
        let inputs = self_check::inputs(&check.inputs, check.count, size)
            .expect("the writer's own generator");
        let (embeddings, dim) = encoder.embed_pixels(&[check.count, 3, size, size], &inputs)?;
        if dim != self.manifest.embedding_dim {
            return Err(Error::Shape {
                what: "image encoder".into(),
                expected: format!("embedding size {}", self.manifest.embedding_dim),
                actual: dim.to_string(),
            });
        }
        let npy = npy::to_bytes(&[check.count, dim], &embeddings);
        self.add_file(SELF_CHECK, SELF_CHECK_FILE, &npy, None)?;
        self.manifest.self_check = Some(check);
        Ok(())
    }

    /// Validates, writes the manifest, verifies the staged folder and moves it into place
    /// (replacing an older bundle only where `create` allowed it).
    pub fn finish(mut self) -> Result<Bundle> {
        #[cfg(feature = "onnx")]
        self.add_self_check()?;
        if !self.manifest.files.contains_key(PREPROCESSOR_CONFIG) {
            let cfg =
                serde_json::to_vec_pretty(&hf_preprocessor_config(&self.manifest.preprocessing))
                    .expect("JSON value serialises");
            self.add_file(PREPROCESSOR_CONFIG, "preprocessor_config.json", &cfg, None)?;
        }
        self.manifest.validate(self.staged.target())?;
        let text = serde_json::to_vec_pretty(&self.manifest).expect("manifest serialises");
        fs::write_atomic(&self.staged.path().join(MANIFEST), &text)?;
        // Verify what was written before it replaces anything.
        Bundle::load(self.staged.path())?;
        let target = self.staged.commit()?;
        Bundle::load(&target)
    }
}

#[cfg(all(test, feature = "embedded"))]
mod tests {
    use super::*;

    /// Copies the built-in bundle through a writer into `requested`; `fail_after` files in, the
    /// next file gets a name that leaves the folder, so the write fails with files already staged.
    fn copy_default(requested: &Path, force: bool, fail_after: Option<usize>) -> Result<Bundle> {
        let source = Bundle::from_embedded(crate::DEFAULT_BUNDLE)?;
        let mut manifest = source.manifest.clone();
        manifest.files.clear();
        let mut writer = BundleWriter::create(requested, manifest, force)?;
        for (i, (role, entry)) in source.manifest.files.iter().enumerate() {
            let name = if fail_after == Some(i) {
                "../escape"
            } else {
                entry.path.as_str()
            };
            let io = entry.input.as_deref().zip(entry.output.as_deref());
            writer.add_file(role, name, &source.read_verified(role)?, io)?;
        }
        writer.finish()
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::leftovers(dir).expect("listing")
    }

    #[test]
    fn a_failure_mid_write_keeps_the_old_bundle_and_leaves_no_staging() {
        let dir = tempfile::tempdir().expect("temp dir");
        let target = dir.path().join("bundle");
        let first = copy_default(&target, false, None).expect("first bundle");
        let manifest_before = std::fs::read(target.join(MANIFEST)).expect("manifest");

        // Two files staged, then the third fails: no new bundle, the old one untouched.
        let err = copy_default(&target, true, Some(2)).expect_err("the escape must fail");
        assert!(
            err.to_string().contains("leaves the bundle folder"),
            "{err}"
        );
        assert_eq!(
            std::fs::read(target.join(MANIFEST)).expect("manifest"),
            manifest_before
        );
        Bundle::load(&target).expect("the old bundle still loads");
        // image encoder, label embeddings, preprocessor config, and the self-check written at finish
        assert_eq!(first.manifest.files.len(), 4);
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );

        // Into a fresh folder: nothing at all is left.
        let fresh = dir.path().join("fresh");
        copy_default(&fresh, false, Some(1)).expect_err("the escape must fail");
        assert!(!fresh.exists());
        assert!(
            leftovers(dir.path()).is_empty(),
            "{:?}",
            leftovers(dir.path())
        );
    }
}
