//! `runtime serve`: the classifier as an HTTP service ([`http`]) and as a DICOM node ([`dicom`]),
//! alone or together in one process, sharing one model.
//!
//! ```text
//! HTTP body / C-STORE instance -> decode + preprocess (HTTP: blocking pool, --workers at a time;
//!                                 DICOM: the association's own thread)
//!              -> bounded queue (--queue; HTTP: admitted before its body is read, else 503 +
//!                 Retry-After; DICOM waits)
//!              -> one encoder thread, batching what arrives together (--max-batch, --max-wait-ms)
//!              -> scores -> the JSON line of `classify --json` (DICOM: with the instance's UIDs and
//!                 body part, to --results)
//! ```
//!
//! SIGTERM or Ctrl-C: no new connections or associations; requests and associations in flight
//! finish; then the process exits.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::{oneshot, watch};

use crate::bundle::Bundle;
use crate::engine::{Engine, EngineOptions};
use crate::image::preprocess::PreprocessConfig;
use crate::text::labels::Label;

pub mod dicom;
pub mod http;

pub use dicom::DicomOptions;
pub use http::HttpOptions;

/// What `runtime serve` runs: the HTTP service, the DICOM node or both, and the batching they share.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub http: Option<HttpOptions>,
    pub dicom: Option<DicomOptions>,
    /// Most images in one encoder call.
    pub max_batch: usize,
    /// How long the encoder waits for more images after the first of a batch.
    pub max_wait: Duration,
    /// Images the HTTP service takes in at once (decoding, waiting, in the encoder; beyond: 503),
    /// and the encoder queue's bound (DICOM senders wait for room).
    pub queue: usize,
    /// Images decoded at once by the HTTP service.
    pub workers: usize,
    /// Labels per image in the answer unless a request says otherwise.
    pub top_k: usize,
}

/// An address the server listens on, reported as soon as it is bound (port 0 picks a free one).
#[derive(Debug, Clone, Copy)]
pub enum Listening {
    Http(SocketAddr),
    Dicom(SocketAddr),
}

/// What the encoder thread is asked to do.
enum Job {
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
enum Refused {
    /// `--queue` images are already waiting.
    Full,
    /// The encoder has ended (the model failed to load, or the server is stopping).
    Stopped,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DicomStatusLabel {
    /// The C-STORE response status, as DICOM writes it: 4 hex digits (`0000` success).
    status: String,
}

struct Metrics {
    registry: Registry,
    requests: Family<StatusLabel, Counter>,
    latency: Histogram,
    batch_size: Histogram,
    queue_depth: Gauge<i64, AtomicI64>,
    instances: Family<DicomStatusLabel, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
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
struct Service {
    jobs: mpsc::SyncSender<Job>,
    ready: AtomicBool,
    preprocessing: PreprocessConfig,
    labels: Vec<Label>,
    label_embeddings: Vec<f32>,
    has_text_encoder: bool,
    logit_scale: f32,
    model_name: String,
    summary: serde_json::Value,
    options: ServeOptions,
    metrics: Metrics,
}

impl Service {
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Queues a job if there is room (the HTTP service: a full queue is answered 503).
    fn try_enqueue(&self, job: Job) -> Result<(), Refused> {
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
    fn enqueue_waiting(&self, job: Job) -> Result<(), Refused> {
        self.metrics.queue_depth.inc();
        self.jobs.send(job).map_err(|_| {
            self.metrics.queue_depth.dec();
            Refused::Stopped
        })
    }
}

/// Serves `bundle` until SIGTERM or Ctrl-C. `on_listening` gets each bound address before the model
/// is loaded; HTTP's `/readyz` says when it is (the DICOM node's C-STOREs wait for it).
pub fn serve(
    bundle: Bundle,
    engine_options: EngineOptions,
    options: ServeOptions,
    on_listening: impl FnMut(Listening),
) -> anyhow::Result<()> {
    if options.http.is_none() && options.dicom.is_none() {
        anyhow::bail!("nothing to serve: give --http, --dicom or both");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .max_blocking_threads(options.workers.max(1) + 2)
        .build()?;
    runtime.block_on(run(bundle, engine_options, options, on_listening))
}

async fn run(
    bundle: Bundle,
    engine_options: EngineOptions,
    options: ServeOptions,
    mut on_listening: impl FnMut(Listening),
) -> anyhow::Result<()> {
    let http_listener = match &options.http {
        Some(h) => Some(
            tokio::net::TcpListener::bind(h.addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {} (--http): {e}", h.addr))?,
        ),
        None => None,
    };
    let dicom_node = match &options.dicom {
        Some(d) => Some(dicom::Node::open(d).await?),
        None => None,
    };
    if let Some(l) = &http_listener {
        on_listening(Listening::Http(l.local_addr()?));
    }
    if let Some(node) = &dicom_node {
        on_listening(Listening::Dicom(node.local_addr()?));
    }
    let (jobs, queue) = mpsc::sync_channel(options.queue.max(1));
    let m = &bundle.manifest;
    let summary = serde_json::json!({
        "name": m.name,
        "description": m.description,
        "labels": bundle.labels().iter().map(|l| serde_json::json!({"id": l.id, "name": l.name})).collect::<Vec<_>>(),
        "embedding_dim": m.embedding_dim,
        "image_size": m.preprocessing.image_size,
        "precision": m.quantization.as_ref().map_or("fp32".to_string(), |q| q.precision.clone()),
        "has_text_encoder": bundle.has_text_encoder(),
    });
    let service = Arc::new(Service {
        jobs,
        ready: AtomicBool::new(false),
        preprocessing: m.preprocessing.clone(),
        labels: bundle.labels().into_iter().cloned().collect(),
        label_embeddings: bundle.label_embeddings.clone(),
        has_text_encoder: bundle.has_text_encoder(),
        logit_scale: m.logit_scale,
        model_name: m.name.clone(),
        summary,
        options: options.clone(),
        metrics: Metrics::new(),
    });
    let load_error = Arc::new(Mutex::new(None));
    // A model that cannot be loaded or fails its self-check stops the server: never ready.
    let (failed, load_failed) = oneshot::channel::<()>();
    let encoder = {
        let service = Arc::clone(&service);
        let load_error = Arc::clone(&load_error);
        std::thread::Builder::new()
            .name("encoder".into())
            .spawn(move || match load_checked(bundle, engine_options) {
                Ok(engine) => {
                    service.ready.store(true, Ordering::SeqCst);
                    let batch_size = service.metrics.batch_size.clone();
                    let depth = service.metrics.queue_depth.clone();
                    let (max_batch, max_wait) =
                        (service.options.max_batch, service.options.max_wait);
                    let templates = engine.bundle.manifest.templates.clone();
                    // The thread holds no sender: it ends when the front ends (the last senders)
                    // are gone.
                    drop(service);
                    encoder_loop(
                        engine,
                        queue,
                        max_batch,
                        max_wait,
                        &templates,
                        &batch_size,
                        &depth,
                    )
                }
                Err(e) => {
                    tracing::error!("{e}");
                    *load_error.lock().expect("not poisoned") = Some(e.to_string());
                    // Waiting senders (DICOM associations) learn that the encoder is gone.
                    drop(queue);
                    let _ = failed.send(());
                }
            })?
    };
    let (stop, stopping) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown_signal() => {},
            Ok(()) = load_failed => {},
        }
        let _ = stop.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let http_task = http_listener.map(|listener| {
        tokio::spawn(http::serve(
            listener,
            Arc::clone(&service),
            stopped(stopping.clone()),
        ))
    });
    let dicom_task = dicom_node
        .map(|node| tokio::spawn(node.serve(Arc::clone(&service), stopped(stopping.clone()))));
    drop(service);
    if let Some(task) = http_task {
        task.await?;
    }
    if let Some(task) = dicom_task {
        task.await?;
    }
    tracing::info!("stopped accepting; requests in flight answered");
    // The front ends (and with them the last queue senders) are gone: the encoder finishes and ends.
    tokio::task::spawn_blocking(move || encoder.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the encoder thread panicked"))?;
    if let Some(e) = load_error.lock().expect("not poisoned").take() {
        anyhow::bail!("not serving: {e}");
    }
    Ok(())
}

/// The engine, once the bundle has reproduced its self-check on this device.
fn load_checked(bundle: Bundle, options: EngineOptions) -> crate::Result<Engine> {
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

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down");
}

/// The encoder thread: takes the first waiting job, gathers what else arrives within `max_wait`
/// (up to `max_batch` images), runs them as one batch, answers each.
fn encoder_loop(
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
