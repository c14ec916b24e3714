//! The HTTP service of `runtime serve`.
//!
//! Endpoints: `POST /v1/classify` (one image as the body, or several as `multipart/form-data`;
//! `?top_k=`, `?labels=`), `GET /v1/model`, `GET /healthz`, `GET /readyz` (once the model is
//! loaded), `GET /metrics` (Prometheus text). Limits: `--max-body` (413), `--queue` (503 with
//! Retry-After), `--timeout-ms` (504), `--header-timeout-ms`, `--max-connections`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::model::{Job, Refused, Service, StatusLabel};
use crate::image::decode::decode_bytes;
use crate::image::preprocess::preprocess;
use crate::text::labels::{self, Label};

/// Most custom labels one request may ask for (each is a text-encoder run).
pub const MAX_REQUEST_LABELS: usize = 256;

#[derive(Debug, Clone)]
pub struct HttpOptions {
    pub addr: SocketAddr,
    /// Largest request body in bytes (413 beyond).
    pub max_body: usize,
    /// Longest a request may wait for its answer (504 beyond).
    pub timeout: Duration,
    /// Longest wait for a request's head on an open connection.
    pub header_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

/// The HTTP front end's state: the shared model service, its options, the decoding bound.
struct Http {
    service: Arc<Service>,
    options: HttpOptions,
    /// Images decoded at once (`--workers`).
    decode: Semaphore,
    /// Images admitted at once (`--queue`).
    admission: Arc<Semaphore>,
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

/// Answers HTTP on `listener` until `shutdown`, then finishes the requests in flight.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<Service>,
    options: HttpOptions,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let http = Arc::new(Http {
        decode: Semaphore::new(service.workers.max(1)),
        admission: Arc::new(Semaphore::new(service.queue.max(1))),
        service,
        options: options.clone(),
    });
    let app = Router::new()
        .route("/v1/classify", post(classify))
        .route("/v1/model", get(model))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(options.max_body))
        .with_state(http);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("listening on http://{addr}");
    }
    serve_connections(listener, app, &options, shutdown).await;
}

/// Accepts HTTP/1.1 connections until `shutdown`. A connection whose request head has not arrived
/// within `--header-timeout-ms` is closed (a client cannot hold one by sending nothing), and at
/// most `--max-connections` are open at once (further clients wait in the listen backlog). Then:
/// no new connections, and those open finish the requests they are in.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: Router,
    options: &HttpOptions,
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

#[derive(serde::Deserialize)]
struct ClassifyQuery {
    top_k: Option<usize>,
    labels: Option<String>,
    /// The top label even where a calibrated bundle says unknown.
    #[serde(default)]
    no_reject: bool,
}

async fn classify(
    State(http): State<Arc<Http>>,
    query: Result<Query<ClassifyQuery>, QueryRejection>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let answered = async {
        // A malformed query gets the same JSON error as every other refusal.
        let Query(query) = query.map_err(|e| Failure(e.status(), e.body_text()))?;
        answer(&http, query, request).await
    };
    let service = &http.service;
    let response = match tokio::time::timeout(http.options.timeout, answered).await {
        Ok(Ok(r)) => r,
        Ok(Err(failure)) => failure.into_response(),
        Err(_) => Failure(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no answer within {} ms", http.options.timeout.as_millis()),
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

async fn answer(http: &Http, query: ClassifyQuery, request: Request) -> Result<Response, Failure> {
    let service = &http.service;
    if !service.is_ready() {
        return Err(Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading".into(),
        ));
    }
    // Admission before any work: a refused request costs neither reading its body nor decoding it,
    // so an overloaded server spends its time on the requests it will answer.
    let mut admitted = vec![admit(http)?];
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
    let k = query.top_k.unwrap_or(service.top_k);
    // A calibration holds for the bundle's own labels only.
    let (scale, reject) = match custom {
        Some(_) => (service.logit_scale, None),
        None => (
            service.calibrated_scale,
            service.reject.as_ref().filter(|_| !query.no_reject),
        ),
    };
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
    for (i, (name, bytes)) in images.into_iter().enumerate() {
        if i > 0 {
            admitted.push(admit(http)?);
        }
        match tensor(http, &name, bytes).await {
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
                let probs = crate::scoring::probabilities(&embedding, label_embeddings, scale);
                let mut line =
                    crate::scoring::json_line(&name, &service.model_name, labels, &probs, k);
                crate::calibration::mark_unknown(&mut line, &embedding, &probs, reject);
                line
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

/// One image's place among the `--queue` images admitted at once (being decoded, waiting for the
/// encoder or in it); none left: 503.
fn admit(http: &Http) -> Result<OwnedSemaphorePermit, Failure> {
    Arc::clone(&http.admission)
        .try_acquire_owned()
        .map_err(|_| {
            Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("busy: {} images are being processed", http.service.queue),
            )
        })
}

fn enqueue(service: &Service, job: Job) -> Result<(), Failure> {
    service.try_enqueue(job).map_err(|refused| match refused {
        Refused::Full => Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("busy: {} images are waiting for the encoder", service.queue),
        ),
        Refused::Stopped => Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the encoder has stopped".into(),
        ),
    })
}

/// Decode and preprocess on the blocking pool, at most `--workers` at once.
async fn tensor(http: &Http, name: &str, bytes: Bytes) -> Result<Vec<f32>, String> {
    let _permit = http
        .decode
        .acquire()
        .await
        .map_err(|_| "shutting down".to_string())?;
    let cfg = http.service.preprocessing.clone();
    let name = std::path::PathBuf::from(name);
    tokio::task::spawn_blocking(move || {
        let img = decode_bytes(&bytes, &name).map_err(|e| e.to_string())?;
        preprocess(&img, &cfg).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| format!("decoder task failed: {e}"))?
}

async fn model(State(http): State<Arc<Http>>) -> axum::Json<serde_json::Value> {
    let mut summary = http.service.summary.clone();
    summary["ready"] = http.service.is_ready().into();
    axum::Json(summary)
}

async fn readyz(State(http): State<Arc<Http>>) -> Response {
    if http.service.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading\n").into_response()
    }
}

async fn metrics(State(http): State<Arc<Http>>) -> Response {
    let mut text = String::new();
    if let Err(e) =
        prometheus_client::encoding::text::encode(&mut text, &http.service.metrics.registry)
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
