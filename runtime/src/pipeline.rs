//! Files -> embeddings, with decoding and preprocessing on worker threads running alongside the
//! encoder, so a folder is limited by the encoder and not by the decoders.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::engine::{Encoder, Engine};
use crate::error::{Error, Result};
use crate::image::decode;
use crate::image::preprocess::{self, PreprocessConfig};
use crate::scoring;
use crate::text::labels::Label;
use crate::text::prompts;
use crate::text::tokenizer::{ClipTokenizer, Padding};

pub use crate::image::files::{collect_files, IMAGE_EXTENSIONS};

/// Decodes and preprocesses one file. A panic inside a decoder (a bug there, met by a hostile file)
/// becomes this file's error instead of ending the run.
pub fn load_tensor(path: &Path, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    std::panic::catch_unwind(|| load_tensor_unguarded(path, cfg)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        Err(Error::Decode {
            path: path.to_path_buf(),
            format: "input",
            reason: format!("the decoder failed ({what})"),
        })
    })
}

fn load_tensor_unguarded(path: &Path, cfg: &PreprocessConfig) -> Result<Vec<f32>> {
    let img = decode::decode_file(path)?;
    preprocess::preprocess(&img, cfg).map_err(|e| match e {
        Error::Preprocess { .. } => Error::Decode {
            path: path.to_path_buf(),
            format: "input",
            reason: e.to_string(),
        },
        other => other,
    })
}

#[derive(Debug, Clone)]
pub struct PipelineOptions {
    pub batch_size: usize,
    /// Decoder threads; 0 = one.
    pub workers: usize,
    pub progress: bool,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            batch_size: 16,
            workers: 1,
            progress: false,
        }
    }
}

/// Image embeddings (not normalised) of every file, in input order; a file that cannot be read gets
/// its error and does not stop the others.
pub fn embed_files(
    engine: &mut Engine,
    files: &[PathBuf],
    opts: &PipelineOptions,
) -> Vec<Result<Vec<f32>>> {
    let cfg = engine.bundle.manifest.preprocessing.clone();
    let batch_size = opts.batch_size.max(1);
    let workers = opts.workers.max(1).min(files.len().max(1));
    let mut results: Vec<Option<Result<Vec<f32>>>> = (0..files.len()).map(|_| None).collect();
    let next = AtomicUsize::new(0);
    let bar = progress_bar(files.len() as u64, opts.progress);
    std::thread::scope(|scope| {
        let (tx, rx) = crossbeam_channel::bounded::<(usize, Result<Vec<f32>>)>(batch_size * 2);
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, cfg) = (&next, &cfg);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= files.len() || tx.send((i, load_tensor(&files[i], cfg))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut pending: Vec<(usize, Vec<f32>)> = Vec::with_capacity(batch_size);
        let mut flush = |pending: &mut Vec<(usize, Vec<f32>)>,
                         results: &mut Vec<Option<Result<Vec<f32>>>>| {
            if pending.is_empty() {
                return;
            }
            let pixels: Vec<f32> = pending
                .iter()
                .flat_map(|(_, t)| t.iter().copied())
                .collect();
            match engine.embed_images(&pixels, pending.len()) {
                Ok(emb) => {
                    let dim = emb.len() / pending.len();
                    for ((i, _), e) in pending.iter().zip(emb.chunks_exact(dim)) {
                        results[*i] = Some(Ok(e.to_vec()));
                    }
                }
                // One bad input must not fail its batch: retry file by file, so only it fails.
                Err(_) => {
                    for (i, t) in pending.iter() {
                        results[*i] =
                            Some(engine.embed_images(t, 1).map_err(|e| Error::Inference {
                                context: files[*i].display().to_string(),
                                reason: e.to_string(),
                            }));
                    }
                }
            }
            bar.inc(pending.len() as u64);
            pending.clear();
        };
        for (i, tensor) in rx {
            match tensor {
                Ok(t) => {
                    pending.push((i, t));
                    if pending.len() == batch_size {
                        flush(&mut pending, &mut results);
                    }
                }
                Err(e) => {
                    results[i] = Some(Err(e));
                    bar.inc(1);
                }
            }
        }
        flush(&mut pending, &mut results);
    });
    bar.finish_and_clear();
    results
        .into_iter()
        .zip(files)
        .map(|(r, path)| {
            r.unwrap_or_else(|| {
                Err(Error::Inference {
                    context: path.display().to_string(),
                    reason: "no result (a decoder thread stopped)".into(),
                })
            })
        })
        .collect()
}

fn progress_bar(len: u64, show: bool) -> indicatif::ProgressBar {
    if show {
        crate::progress::bar(len, "images")
    } else {
        indicatif::ProgressBar::hidden()
    }
}

/// Label embeddings (normalised, `[labels x dim]`) from the bundle's text encoder: every template is
/// filled with every label, encoded, normalised, and the templates averaged.
pub fn text_label_embeddings(
    engine: &mut Engine,
    labels: &[Label],
    templates: &[String],
) -> Result<Vec<f32>> {
    let tok_path = engine
        .bundle
        .file_path(crate::bundle::TOKENIZER)
        .ok_or_else(|| Error::bundle(&engine.bundle.dir, "has no tokenizer"))?;
    let tokenizer = ClipTokenizer::from_bytes(
        &engine.bundle.read_verified(crate::bundle::TOKENIZER)?,
        &tok_path,
    )?;
    let dim = engine.bundle.manifest.embedding_dim;
    let (emb, got) = prompt_embeddings(engine.text_encoder()?, &tokenizer, labels, templates)?;
    if got != dim {
        return Err(Error::Shape {
            what: "text encoder".into(),
            expected: format!("embedding size {dim}"),
            actual: got.to_string(),
        });
    }
    Ok(emb)
}

/// Label embeddings from a text encoder: returns `[labels x dim]` (normalised, templates averaged) and `dim`.
pub fn prompt_embeddings(
    encoder: &mut Encoder,
    tokenizer: &ClipTokenizer,
    labels: &[Label],
    templates: &[String],
) -> Result<(Vec<f32>, usize)> {
    let texts = prompts::prompts(templates, labels)?;
    let mut per_template = Vec::with_capacity(templates.len());
    let mut dim = 0;
    for one_template in texts.chunks(labels.len().max(1)) {
        let tokens = tokenizer.encode_batch(one_template, Padding::Longest)?;
        let (emb, d) = encoder.embed_tokens(&tokens)?;
        dim = d;
        per_template.push(emb);
    }
    Ok((scoring::ensemble(&per_template, dim), dim))
}
