//! Files -> embeddings, with decoding and preprocessing on worker threads running alongside the
//! encoder, so a folder is limited by the encoder and not by the decoders.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::image::files::Listed;

use crate::engine::{Encoder, Engine};
use crate::error::{Error, Result};
use crate::image::decode;
use crate::image::preprocess::{self, PreprocessConfig};
use crate::scoring;
use crate::text::labels::Label;
use crate::text::prompts;
use crate::text::tokenizer::{ClipTokenizer, Padding};

pub use crate::image::files::{collect_files, list, IMAGE_EXTENSIONS};

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
            workers: default_workers(),
            progress: false,
        }
    }
}

/// Decoder threads by default: one per core (decoding runs beside the encoder, which waits for
/// whole batches).
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// One input's outcome: its path and its image embedding (not normalised) or why it has none.
pub type Embedded = (PathBuf, Result<Vec<f32>>);

/// Image embeddings of every file, in input order; a file that cannot be read gets its error and
/// does not stop the others ([`embed_stream`] collected).
pub fn embed_files(
    engine: &mut Engine,
    files: &[PathBuf],
    opts: &PipelineOptions,
) -> Vec<Result<Vec<f32>>> {
    let bar = progress_bar(Some(files.len() as u64), opts.progress);
    let mut out = Vec::with_capacity(files.len());
    let listing = || files.iter().cloned().map(Ok);
    let quiet = PipelineOptions {
        progress: false,
        ..opts.clone()
    };
    let done = embed_stream(engine, listing, &quiet, |batch| {
        bar.inc(batch.len() as u64);
        out.extend(batch.into_iter().map(|(_, r)| r));
        Ok(())
    });
    bar.finish_and_clear();
    // Collecting cannot fail; were a result missing all the same, its file says so.
    let missing = done.err().map(|e| e.to_string());
    for path in &files[out.len()..] {
        out.push(Err(Error::Inference {
            context: path.display().to_string(),
            reason: missing.clone().unwrap_or_else(|| "no result".into()),
        }));
    }
    out
}

/// Embeds the files of a listing with memory that does not grow with their number: the listing
/// runs on its own thread (`listing` makes it there, so it need not be `Send`: stdin), decoding
/// and preprocessing on `workers` threads beside the encoder, and each run of finished results
/// goes to `emit` in input order as soon as all before it are done. At most a few batches are in
/// flight. A file that cannot be read gets its error and does not stop the others; an error from
/// `emit` (the output is gone) stops the run and is returned.
pub fn embed_stream<L, I>(
    engine: &mut Engine,
    listing: L,
    opts: &PipelineOptions,
    mut emit: impl FnMut(Vec<Embedded>) -> Result<()>,
) -> Result<()>
where
    L: FnOnce() -> I + Send,
    I: Iterator<Item = Listed>,
{
    let cfg = engine.bundle.manifest.preprocessing.clone();
    let batch_size = opts.batch_size.max(1);
    let workers = opts.workers.max(1);
    // Inputs handed out and not yet emitted; the listing waits for a credit before each one.
    let window = batch_size * 4 + workers;
    let issued = AtomicUsize::new(0);
    let bar = progress_bar(None, opts.progress);
    let result = std::thread::scope(|scope| {
        let (credit_tx, credit_rx) = crossbeam_channel::bounded::<()>(window);
        for _ in 0..window {
            credit_tx.send(()).expect("room for every credit");
        }
        let (work_tx, work_rx) = crossbeam_channel::bounded::<(usize, Listed)>(window);
        let (done_tx, done_rx) =
            crossbeam_channel::bounded::<(usize, PathBuf, Result<Vec<f32>>)>(window);
        let issued = &issued;
        scope.spawn(move || {
            for (seq, item) in listing().enumerate() {
                if credit_rx.recv().is_err() {
                    break;
                }
                issued.store(seq + 1, Ordering::Release);
                if work_tx.send((seq, item)).is_err() {
                    break;
                }
            }
        });
        for _ in 0..workers {
            let (work_rx, done_tx, cfg) = (work_rx.clone(), done_tx.clone(), &cfg);
            scope.spawn(move || {
                for (seq, item) in work_rx {
                    let (path, tensor) = match item {
                        Ok(path) => {
                            let t = load_tensor(&path, cfg);
                            (path, t)
                        }
                        Err(unlisted) => {
                            let (path, e) = *unlisted;
                            (path, Err(e))
                        }
                    };
                    if done_tx.send((seq, path, tensor)).is_err() {
                        break;
                    }
                }
            });
        }
        drop((work_rx, done_tx));
        let mut order = Reorder::default();
        let mut pending: Vec<(usize, PathBuf, Vec<f32>)> = Vec::with_capacity(batch_size);
        let mut received = 0;
        let outcome = loop {
            let message = match done_rx.try_recv() {
                Ok(m) => Some(m),
                Err(crossbeam_channel::TryRecvError::Disconnected) => None,
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    // Everything handed out is here: encode what waits rather than wait for more.
                    if !pending.is_empty() && received == issued.load(Ordering::Acquire) {
                        encode_batch(engine, &mut pending, &mut order);
                        if let Err(e) = order.emit(&mut emit, &credit_tx, &bar) {
                            break Err(e);
                        }
                        continue;
                    }
                    done_rx.recv().ok()
                }
            };
            let Some((seq, path, tensor)) = message else {
                encode_batch(engine, &mut pending, &mut order);
                break order.emit(&mut emit, &credit_tx, &bar);
            };
            received += 1;
            match tensor {
                Ok(t) => pending.push((seq, path, t)),
                Err(e) => order.put(seq, (path, Err(e))),
            }
            if pending.len() >= batch_size {
                encode_batch(engine, &mut pending, &mut order);
            }
            if let Err(e) = order.emit(&mut emit, &credit_tx, &bar) {
                break Err(e);
            }
        };
        // Stops the listing and the decoders if the run ended early (they see closed channels).
        drop((done_rx, credit_tx));
        outcome
    });
    bar.finish_and_clear();
    result
}

/// Finished results waiting for those before them.
#[derive(Default)]
struct Reorder {
    next: usize,
    ready: std::collections::BTreeMap<usize, Embedded>,
}

impl Reorder {
    fn put(&mut self, seq: usize, item: Embedded) {
        self.ready.insert(seq, item);
    }

    /// Hands the run of consecutive finished results to `emit`, and their credits back.
    fn emit(
        &mut self,
        emit: &mut impl FnMut(Vec<Embedded>) -> Result<()>,
        credits: &crossbeam_channel::Sender<()>,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let mut run = Vec::new();
        while let Some(item) = self.ready.remove(&self.next) {
            run.push(item);
            self.next += 1;
        }
        if run.is_empty() {
            return Ok(());
        }
        let n = run.len();
        bar.suspend(|| emit(run))?;
        bar.inc(n as u64);
        for _ in 0..n {
            // Credits are never more than the channel holds; the listing may have ended.
            let _ = credits.try_send(());
        }
        Ok(())
    }
}

/// Runs the encoder on the decoded images waiting in `pending`; a batch that fails is retried file
/// by file, so only the bad input fails.
fn encode_batch(
    engine: &mut Engine,
    pending: &mut Vec<(usize, PathBuf, Vec<f32>)>,
    order: &mut Reorder,
) {
    if pending.is_empty() {
        return;
    }
    let pixels: Vec<f32> = pending
        .iter()
        .flat_map(|(_, _, t)| t.iter().copied())
        .collect();
    match engine.embed_images(&pixels, pending.len()) {
        Ok(emb) => {
            let dim = emb.len() / pending.len();
            for ((seq, path, _), e) in pending.drain(..).zip(emb.chunks_exact(dim)) {
                order.put(seq, (path, Ok(e.to_vec())));
            }
        }
        Err(_) => {
            for (seq, path, t) in pending.drain(..) {
                let r = engine.embed_images(&t, 1).map_err(|e| Error::Inference {
                    context: path.display().to_string(),
                    reason: e.to_string(),
                });
                order.put(seq, (path, r));
            }
        }
    }
}

fn progress_bar(len: Option<u64>, show: bool) -> indicatif::ProgressBar {
    match (show, len) {
        (false, _) => indicatif::ProgressBar::hidden(),
        (true, Some(len)) => crate::progress::bar(len, "images"),
        (true, None) => crate::progress::counter("images"),
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
