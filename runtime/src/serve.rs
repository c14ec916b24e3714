//! `runtime serve`: the classifier as an HTTP service.
//!
//! ```text
//! request body -> decode + preprocess (blocking pool, --workers at a time)
//!              -> bounded queue (--queue; full: 503 + Retry-After)
//!              -> one encoder thread, batching what arrives together (--max-batch, --max-wait-ms)
//!              -> scores -> the JSON line of `classify --json`
//! ```
//!
//! Endpoints: `POST /v1/classify` (one image as the body, or several as `multipart/form-data`;
//! `?top_k=`, `?labels=`), `GET /v1/model`, `GET /healthz`, `GET /readyz` (once the model is
//! loaded), `GET /metrics` (Prometheus text). SIGTERM or Ctrl-C: no new connections, requests in
//! flight are answered, then the process exits.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::{oneshot, Semaphore};

use crate::bundle::Bundle;
use crate::engine::{Engine, EngineOptions};
use crate::image::decode::decode_bytes;
use crate::image::preprocess::{preprocess, PreprocessConfig};
use crate::text::labels::{self, Label};

/// Most custom labels one request may ask for (each is a text-encoder run).
pub const MAX_REQUEST_LABELS: usize = 256;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub http: SocketAddr,
    /// Most images in one encoder call.
    pub max_batch: usize,
    /// How long the encoder waits for more images after the first of a batch.
    pub max_wait: Duration,
    /// Images waiting for the encoder; beyond it requests get 503.
    pub queue: usize,
    /// Largest request body in bytes (413 beyond).
    pub max_body: usize,
    /// Longest a request may wait for its answer (504 beyond).
    pub timeout: Duration,
    /// Images decoded at once.
    pub workers: usize,
    /// Labels per image in the answer unless `?top_k=` says otherwise.
    pub top_k: usize,
    /// Longest wait for a request's head on an open connection.
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: u16,
}

struct Metrics {
    registry: Registry,
    requests: Family<StatusLabel, Counter>,
    latency: Histogram,
    batch_size: Histogram,
    queue_depth: Gauge<i64, AtomicI64>,
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
        Metrics {
            registry,
            requests,
            latency,
            batch_size,
            queue_depth,
        }
    }
}

struct Service {
    jobs: mpsc::SyncSender<Job>,
    ready: AtomicBool,
    decode: Semaphore,
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

/// An answer that is not 200: the status and a one-line reason, as JSON `{"error": ...}`.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut r = (self.0, axum::Json(serde_json::json!({"error": self.1}))).into_response();
        if self.0 == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// Serves `bundle` until SIGTERM or Ctrl-C. `on_listening` gets the bound address (port 0 picks
/// a free one) before the model is loaded; `/readyz` says when it is.
pub fn serve(
    bundle: Bundle,
    engine_options: EngineOptions,
    options: ServeOptions,
    on_listening: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
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
    on_listening: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(options.http)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", options.http))?;
    on_listening(listener.local_addr()?);
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
        decode: Semaphore::new(options.workers.max(1)),
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
                    // The thread holds no sender: it ends when the server (the last sender) is gone.
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
                    let _ = failed.send(());
                }
            })?
    };
    let app = Router::new()
        .route("/v1/classify", post(classify))
        .route("/v1/model", get(model))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(options.max_body))
        .with_state(Arc::clone(&service));
    drop(service);
    tracing::info!("listening on http://{}", listener.local_addr()?);
    serve_connections(listener, app, &options, async {
        tokio::select! {
            _ = shutdown_signal() => {},
            Ok(()) = load_failed => {},
        }
    })
    .await;
    tracing::info!("stopped accepting; requests in flight answered");
    // The router (and with it the last queue sender) is gone: the encoder finishes and ends.
    encoder
        .join()
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

/// Accepts HTTP/1.1 connections until `shutdown`. A connection whose request head has not arrived
/// within `--header-timeout-ms` is closed (a client cannot hold one by sending nothing), and at
/// most `--max-connections` are open at once (further clients wait in the listen backlog). Then:
/// no new connections, and those open finish the requests they are in.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    options: &ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(options.max_connections.max(1)));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(options.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => p.expect("the semaphore is never closed"),
            _ = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // Answers are small and written in pieces: without this, Nagle's algorithm holds them back.
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
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

#[derive(serde::Deserialize)]
struct ClassifyQuery {
    top_k: Option<usize>,
    labels: Option<String>,
}

async fn classify(
    State(service): State<Arc<Service>>,
    query: Result<Query<ClassifyQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let answered = async {
        // A malformed query gets the same JSON error as every other refusal.
        let Query(query) = query.map_err(|e| Failure(e.status(), e.body_text()))?;
        answer(&service, query, request).await
    };
    let response = match tokio::time::timeout(service.options.timeout, answered).await {
        Ok(Ok(r)) => r,
        Ok(Err(failure)) => failure.into_response(),
        Err(_) => Failure(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "no answer within {} ms",
                service.options.timeout.as_millis()
            ),
        )
        .into_response(),
    };
    service
        .metrics
        .requests
        .get_or_create(&StatusLabel {
            status: response.status().as_u16(),
        })
        .inc();
    service
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    response
}

async fn answer(
    service: &Arc<Service>,
    query: ClassifyQuery,
    request: Request,
) -> Result<Response, Failure> {
    if !service.ready.load(Ordering::SeqCst) {
        return Err(Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading".into(),
        ));
    }
    // Custom labels and their embeddings; None: the bundle's own (borrowed, not copied).
    let custom: Option<(Vec<Label>, Vec<f32>)> = match &query.labels {
        None => None,
        Some(_) if !service.has_text_encoder => {
            return Err(Failure(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "this bundle has no text encoder, so it scores only its own {} labels: drop ?labels=",
                    service.labels.len()
                ),
            ));
        }
        Some(spec) => {
            let labels = request_labels(spec)?;
            let (reply, answer) = oneshot::channel();
            enqueue(
                service,
                Job::Labels {
                    labels: labels.clone(),
                    reply,
                },
            )?;
            let emb = answer
                .await
                .map_err(|_| Failure(StatusCode::INTERNAL_SERVER_ERROR, "encoder gone".into()))?
                .map_err(|e| Failure(StatusCode::UNPROCESSABLE_ENTITY, e))?;
            Some((labels, emb))
        }
    };
    let (labels, label_embeddings) = match &custom {
        Some((labels, emb)) => (labels.as_slice(), emb.as_slice()),
        None => (
            service.labels.as_slice(),
            service.label_embeddings.as_slice(),
        ),
    };
    let k = query.top_k.unwrap_or(service.options.top_k);
    if k == 0 || k > labels.len() {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!("top_k {k} is not between 1 and the {} labels", labels.len()),
        ));
    }
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let images: Vec<(String, Bytes)> = if multipart {
        let mut form = Multipart::from_request(request, &())
            .await
            .map_err(|e| Failure(e.status(), e.body_text()))?;
        let mut parts = Vec::new();
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| Failure(e.status(), e.body_text()))?
        {
            let name = field
                .file_name()
                .or(field.name())
                .unwrap_or("image")
                .to_string();
            let data = field
                .bytes()
                .await
                .map_err(|e| Failure(e.status(), e.body_text()))?;
            parts.push((name, data));
        }
        parts
    } else {
        let body = Bytes::from_request(request, &())
            .await
            .map_err(|e| Failure(e.status(), e.body_text()))?;
        vec![("body".to_string(), body)]
    };
    if images.is_empty() {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "no image in the request".into(),
        ));
    }
    let single = !multipart;
    let mut lines = Vec::with_capacity(images.len());
    // Every image is queued before any answer is awaited, so one request's images share batches.
    let mut waiting = Vec::with_capacity(images.len());
    for (name, bytes) in images {
        match tensor(service, &name, bytes).await {
            Ok(pixels) => {
                let (reply, answer) = oneshot::channel();
                enqueue(service, Job::Image { pixels, reply })?;
                waiting.push((name, Ok(answer)));
            }
            Err(e) if single => return Err(Failure(StatusCode::UNPROCESSABLE_ENTITY, e)),
            Err(e) => waiting.push((name, Err(e))),
        }
    }
    for (name, answer) in waiting {
        let line = match answer {
            Ok(answer) => {
                let embedding = answer
                    .await
                    .map_err(|_| Failure(StatusCode::INTERNAL_SERVER_ERROR, "encoder gone".into()))?
                    .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e))?;
                let probs = crate::scoring::probabilities(
                    &embedding,
                    label_embeddings,
                    service.logit_scale,
                );
                crate::scoring::json_line(&name, &service.model_name, labels, &probs, k)
            }
            Err(e) => serde_json::json!({"file": name, "error": e}),
        };
        lines.push(line.to_string());
    }
    let content_type = if single {
        "application/json"
    } else {
        "application/x-ndjson"
    };
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        lines.join("\n") + "\n",
    )
        .into_response())
}

/// `?labels=`: a built-in set name or a comma-separated list (never a file on the server).
fn request_labels(spec: &str) -> Result<Vec<Label>, Failure> {
    let bad = |e: String| Failure(StatusCode::BAD_REQUEST, e);
    let list = match labels::builtin(spec.trim()) {
        Some(set) => set,
        None => labels::from_list(spec.split(',')).map_err(|e| bad(e.to_string()))?,
    };
    if list.len() > MAX_REQUEST_LABELS {
        return Err(bad(format!(
            "{} labels; at most {MAX_REQUEST_LABELS} per request",
            list.len()
        )));
    }
    Ok(list)
}

fn enqueue(service: &Service, job: Job) -> Result<(), Failure> {
    service.metrics.queue_depth.inc();
    service.jobs.try_send(job).map_err(|e| {
        service.metrics.queue_depth.dec();
        match e {
            mpsc::TrySendError::Full(_) => Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "busy: {} images are waiting for the encoder",
                    service.options.queue
                ),
            ),
            mpsc::TrySendError::Disconnected(_) => Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "the encoder has stopped".into(),
            ),
        }
    })
}

/// Decode and preprocess on the blocking pool, at most `--workers` at once.
async fn tensor(service: &Arc<Service>, name: &str, bytes: Bytes) -> Result<Vec<f32>, String> {
    let _permit = service
        .decode
        .acquire()
        .await
        .map_err(|_| "shutting down".to_string())?;
    let cfg = service.preprocessing.clone();
    let name = std::path::PathBuf::from(name);
    tokio::task::spawn_blocking(move || {
        let img = decode_bytes(&bytes, &name).map_err(|e| e.to_string())?;
        preprocess(&img, &cfg).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("decoder task failed: {e}"))?
}

async fn model(State(service): State<Arc<Service>>) -> axum::Json<serde_json::Value> {
    let mut summary = service.summary.clone();
    summary["ready"] = service.ready.load(Ordering::SeqCst).into();
    axum::Json(summary)
}

async fn readyz(State(service): State<Arc<Service>>) -> Response {
    if service.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading\n").into_response()
    }
}

async fn metrics(State(service): State<Arc<Service>>) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &service.metrics.registry)
    {
        return Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
