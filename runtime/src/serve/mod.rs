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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::bundle::Bundle;
use crate::engine::EngineOptions;

pub mod dicom;
pub mod http;
mod model;

use self::model::{encoder_loop, load_checked, Metrics, Service};

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
        calibrated_scale: m.calibrated_logit_scale(),
        reject: bundle.reject_rule(),
        model_name: m.name.clone(),
        summary,
        queue: options.queue,
        top_k: options.top_k,
        workers: options.workers,
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
                    let (max_batch, max_wait) = (options.max_batch, options.max_wait);
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
    let http_task = http_listener
        .zip(options.http.clone())
        .map(|(listener, http)| {
            tokio::spawn(http::serve(
                listener,
                Arc::clone(&service),
                http,
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
