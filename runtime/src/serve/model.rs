//! What both front ends share: the queue to the encoder thread, the encoder loop that batches what
//! arrives together, the scoring inputs, and the metrics.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::oneshot;

use crate::bundle::Bundle;
use crate::engine::{Engine, EngineOptions};
use crate::image::preprocess::PreprocessConfig;
use crate::text::labels::Label;

/// What the encoder thread is asked to do.
pub(super) enum Job {
    /// One preprocessed image: its embedding (normalised by the scorer).
    Image {
        pixels: Vec<f32>,
        reply: oneshot::Sender<Result<Vec<f32>, String>>,
    },
    /// Custom labels: their normalised embeddings from the bundle's text encoder.
    Labels {
        labels: Vec<Label>,
        reply: oneshot::Sender<Result<Vec<f32>, String>>,
    },
}

/// Why a job was not queued.
pub(super) enum Refused {
    /// `--queue` images are already waiting.
    Full,
    /// The encoder has ended (the model failed to load, or the server is stopping).
    Stopped,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct StatusLabel {
    pub(super) status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DicomStatusLabel {
    /// The C-STORE response status, as DICOM writes it: 4 hex digits (`0000` success).
    pub(super) status: String,
}

pub(super) struct Metrics {
    pub(super) registry: Registry,
    pub(super) requests: Family<StatusLabel, Counter>,
    pub(super) latency: Histogram,
    pub(super) batch_size: Histogram,
    pub(super) queue_depth: Gauge<i64, AtomicI64>,
    pub(super) instances: Family<DicomStatusLabel, Counter>,
}

impl Metrics {
    pub(super) fn new() -> Metrics {
        let mut registry = Registry::with_prefix("xray_clip");
        let requests = Family::<StatusLabel, Counter>::default();
        let latency = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]);
        let queue_depth = Gauge::<i64, AtomicI64>::default();
        let instances = Family::<DicomStatusLabel, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by status",
            requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from request to answer",
            latency.clone(),
        );
        registry.register(
            "encoder_batch_size",
            "Images per encoder call",
            batch_size.clone(),
        );
        registry.register(
            "queue_depth",
            "Images waiting for the encoder",
            queue_depth.clone(),
        );
        registry.register(
            "dicom_instances",
            "DICOM instances received by C-STORE, by response status",
            instances.clone(),
        );
        Metrics {
            registry,
            requests,
            latency,
            batch_size,
            queue_depth,
            instances,
        }
    }
}

/// The model as both front ends see it: the queue to the encoder and what scoring needs.
pub(super) struct Service {
    pub(super) jobs: mpsc::SyncSender<Job>,
    pub(super) ready: AtomicBool,
    pub(super) preprocessing: PreprocessConfig,
    pub(super) labels: Vec<Label>,
    pub(super) label_embeddings: Vec<f32>,
    pub(super) has_text_encoder: bool,
    pub(super) logit_scale: f32,
    /// For the bundle's own labels: the logit scale over the calibrated temperature, and the
    /// "unknown" rule (`runtime calibrate`).
    pub(super) calibrated_scale: f32,
    pub(super) reject: Option<crate::calibration::RejectRule>,
    pub(super) model_name: String,
    pub(super) summary: serde_json::Value,
    /// `--queue`: the encoder queue's bound, and the HTTP service's admission bound.
    pub(super) queue: usize,
    /// `--top-k`.
    pub(super) top_k: usize,
    /// `--workers`: images the HTTP service decodes at once.
    pub(super) workers: usize,
    pub(super) metrics: Metrics,
}

impl Service {
    pub(super) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Queues a job if there is room (the HTTP service: a full queue is answered 503).
    pub(super) fn try_enqueue(&self, job: Job) -> Result<(), Refused> {
        self.metrics.queue_depth.inc();
        self.jobs.try_send(job).map_err(|e| {
            self.metrics.queue_depth.dec();
            match e {
                mpsc::TrySendError::Full(_) => Refused::Full,
                mpsc::TrySendError::Disconnected(_) => Refused::Stopped,
            }
        })
    }

    /// Queues a job, waiting for room (the DICOM node: the sender waits for its response).
    pub(super) fn enqueue_waiting(&self, job: Job) -> Result<(), Refused> {
        self.metrics.queue_depth.inc();
        self.jobs.send(job).map_err(|_| {
            self.metrics.queue_depth.dec();
            Refused::Stopped
        })
    }
}

/// The engine, once the bundle has reproduced its self-check on this device.
pub(super) fn load_checked(bundle: Bundle, options: EngineOptions) -> crate::Result<Engine> {
    let mut engine = Engine::load(bundle, options)?;
    match engine.self_check()? {
        Some(diff) => tracing::info!(
            "model loaded, self-check passed on {} (largest difference {diff:.1e}): ready",
            engine.device().name()
        ),
        None => tracing::warn!(
            "model loaded: ready (the bundle has no self-check; written before they existed)"
        ),
    }
    Ok(engine)
}

/// The encoder thread: takes the first waiting job, gathers what else arrives within `max_wait`
/// (up to `max_batch` images), runs them as one batch, answers each.
pub(super) fn encoder_loop(
    mut engine: Engine,
    queue: mpsc::Receiver<Job>,
    max_batch: usize,
    max_wait: Duration,
    templates: &[String],
    batch_size: &Histogram,
    depth: &Gauge<i64, AtomicI64>,
) {
    let dim = engine.bundle.manifest.embedding_dim;
    let mut pending: Option<Job> = None;
    loop {
        let first = match pending.take() {
            Some(job) => job,
            None => match queue.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        depth.dec();
        let (pixels, reply) = match first {
            Job::Labels { labels, reply } => {
                let result =
                    crate::pipeline::text_label_embeddings(&mut engine, &labels, templates)
                        .map_err(|e| e.to_string());
                let _ = reply.send(result);
                continue;
            }
            Job::Image { pixels, reply } => (pixels, reply),
        };
        let mut batch = pixels;
        let mut replies = vec![reply];
        let deadline = Instant::now() + max_wait;
        while replies.len() < max_batch {
            let left = deadline.saturating_duration_since(Instant::now());
            match queue.recv_timeout(left) {
                Ok(Job::Image { pixels, reply }) => {
                    depth.dec();
                    batch.extend_from_slice(&pixels);
                    replies.push(reply);
                }
                Ok(labels) => {
                    // Counted when it is taken up, at the top of the loop.
                    pending = Some(labels);
                    break;
                }
                Err(_) => break,
            }
        }
        batch_size.observe(replies.len() as f64);
        match engine.embed_images(&batch, replies.len()) {
            Ok(embeddings) => {
                for (reply, e) in replies.into_iter().zip(embeddings.chunks_exact(dim)) {
                    let _ = reply.send(Ok(e.to_vec()));
                }
            }
            Err(e) => {
                tracing::error!("encoder: {e}");
                for reply in replies {
                    let _ = reply.send(Err(format!("encoder: {e}")));
                }
            }
        }
    }
}
