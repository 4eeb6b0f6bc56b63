//! The HTTP API, on axum: `POST /v1/predict` and `POST /v1/features` (the raw bytes of one image of any format
//! `predict` reads, or `multipart/form-data` with several), KServe v2's `GET /v2/health/live` and
//! `/v2/health/ready`, and `GET /metrics`.
//!
//! Every failure is a one-line JSON error (`{"error": "..."}`) with a 4xx status when the request is at fault:
//! 400 a bad image or an empty body, 404 an unknown path, 408 a body slower than the request timeout, 413 a body
//! over the limit, and 503 with `Retry-After` while the model loads, while the server drains, or when the queue
//! is full; 504 when the answer would come later than the timeout. A bad image fails only its own request: the
//! others batched with it are unaffected, since images are decoded (in parallel, on tokio's blocking pool)
//! before they reach the batcher.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Multipart, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::batcher::{Incoming, Job, Output, Queue};
use super::metrics::Metrics;
use crate::engine::Tensor;
use crate::infer;
use crate::infer::card::Preprocess;
use crate::model::Tap;

/// What every handler shares.
pub struct App {
    pub queue: Queue,
    pub metrics: Arc<Metrics>,
    /// Set once the network is open and warmed up.
    pub ready: Arc<AtomicBool>,
    /// Set when shutdown starts: health says not ready, new inference requests get 503.
    pub draining: AtomicBool,
    pub preprocess: Preprocess,
    pub labels: Vec<String>,
    pub top_k: usize,
    pub body_limit: usize,
    pub request_timeout: Duration,
    /// Images one multipart request may carry.
    pub max_images: usize,
}

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/features", post(features))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(app.body_limit))
        .layer(middleware::from_fn_with_state(app.clone(), record))
        .with_state(app)
}

/// A failed request: its status and one line of explanation.
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl std::fmt::Display) -> ApiError {
        let message = message.to_string().lines().map(str::trim).collect::<Vec<_>>().join(" ");
        ApiError { status, message }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(json!({"error": self.message}))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

async fn record(State(app): State<Arc<App>>, path: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let endpoint = path.map_or_else(|| "other".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(req).await;
    app.metrics.record_request(&endpoint, response.status().as_u16(), started.elapsed());
    response
}

async fn live() -> Response {
    axum::Json(json!({"live": true})).into_response()
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    let ready = app.ready.load(Ordering::SeqCst) && !app.draining.load(Ordering::SeqCst);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(json!({"ready": ready}))).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    // The gauge is read off the queue's own count at scrape time.
    app.metrics.queue_depth.set(app.queue.depth() as i64);
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], app.metrics.render()).into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("no such endpoint: {} {}", req.method(), req.uri().path()))
}

async fn predict(State(app): State<Arc<App>>, req: Request) -> Result<Response, ApiError> {
    let (images, multipart) = run(&app, req, Output::Logits).await?;
    let (names, rows): (Vec<String>, Vec<Vec<f32>>) = images.into_iter().unzip();
    let classes = rows.first().map_or(0, Vec::len);
    let logits = Tensor::new(&[rows.len(), classes], rows.concat())
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let k = app.top_k.min(app.labels.len());
    let results =
        names.iter().zip(infer::top_k(&logits, k)).map(|(name, top)| infer::top_json(name, &top, &app.labels));
    Ok(respond(results.collect(), multipart))
}

#[derive(Deserialize)]
struct FeaturesQuery {
    layer: Option<String>,
}

async fn features(
    State(app): State<Arc<App>>,
    Query(q): Query<FeaturesQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    let layer = q.layer.unwrap_or_else(|| "avgpool".to_string());
    let tap: Tap = layer.parse().map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let (images, multipart) = run(&app, req, Output::Features(tap)).await?;
    let results =
        images.into_iter().map(|(name, row)| json!({"file": name, "layer": layer, "features": row})).collect();
    Ok(respond(results, multipart))
}

/// One object for a raw-body request, an array in part order for a multipart one.
fn respond(mut results: Vec<Value>, multipart: bool) -> Response {
    let body = if multipart || results.len() != 1 { Value::Array(results) } else { results.remove(0) };
    axum::Json(body).into_response()
}

/// Read, decode and run the request's images, within the request timeout: each image's name (the multipart
/// file name, or "body") and its output row.
async fn run(app: &Arc<App>, req: Request, output: Output) -> Result<(Vec<(String, Vec<f32>)>, bool), ApiError> {
    let deadline = tokio::time::Instant::now() + app.request_timeout;
    if !app.ready.load(Ordering::SeqCst) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the model is still loading"));
    }
    if app.draining.load(Ordering::SeqCst) {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down"));
    }
    let timeout = app.request_timeout.as_secs_f64();
    // At least one image is on its way from the moment the request is accepted.
    let reading = app.queue.incoming(1);
    let (files, multipart) = tokio::time::timeout_at(deadline, read_images(app, req)).await.map_err(|_| {
        ApiError::new(StatusCode::REQUEST_TIMEOUT, format!("request body not received within {timeout} s"))
    })??;
    let decoding = app.queue.incoming(files.len());
    drop(reading);
    tokio::time::timeout_at(deadline, infer_images(app, files, decoding, output))
        .await
        .map_err(|_| ApiError::new(StatusCode::GATEWAY_TIMEOUT, format!("no answer within {timeout} s")))?
        .map(|rows| (rows, multipart))
}

/// The request's image files: the whole body, or each part of a multipart body.
async fn read_images(app: &App, req: Request) -> Result<(Vec<(String, Bytes)>, bool), ApiError> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"));
    let mut files = Vec::new();
    if multipart {
        let reject = |e: axum::extract::multipart::MultipartError| ApiError::new(e.status(), e.body_text());
        let mut parts =
            Multipart::from_request(req, &()).await.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        while let Some(field) = parts.next_field().await.map_err(reject)? {
            let name =
                field.file_name().or(field.name()).map_or_else(|| format!("part {}", files.len() + 1), str::to_string);
            let bytes = field.bytes().await.map_err(reject)?;
            files.push((name, bytes));
            if files.len() > app.max_images {
                let msg = format!("more than {} images in one request", app.max_images);
                return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, msg));
            }
        }
    } else {
        let bytes = Bytes::from_request(req, &()).await.map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        files.push(("body".to_string(), bytes));
    }
    if files.is_empty() || files.iter().any(|(_, b)| b.is_empty()) {
        let msg = "empty image: send the image file as the body, or multipart/form-data with one file per part";
        return Err(ApiError::new(StatusCode::BAD_REQUEST, msg));
    }
    Ok((files, multipart))
}

/// Decode every file in parallel, queue them all (then `incoming`, which announced them, is dropped), and wait
/// for their rows.
async fn infer_images(
    app: &Arc<App>,
    files: Vec<(String, Bytes)>,
    incoming: Incoming,
    output: Output,
) -> Result<Vec<(String, Vec<f32>)>, ApiError> {
    let decoding: Vec<_> = files
        .into_iter()
        .map(|(name, bytes)| {
            let pre = app.preprocess.clone();
            tokio::task::spawn_blocking(move || {
                let image = infer::preprocess_bytes(&bytes, Path::new(&name), &pre);
                (name, image)
            })
        })
        .collect();
    let mut images = Vec::with_capacity(decoding.len());
    for task in decoding {
        let (name, image) =
            task.await.map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("decoder: {e}")))?;
        images.push((name, image.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?));
    }
    let mut waiting = Vec::with_capacity(images.len());
    for (name, image) in images {
        let (reply, answer) = oneshot::channel();
        let job = Job { image, output, reply, queued: Instant::now() };
        if app.queue.submit(job).is_err() {
            let msg = format!("the queue is full ({} images waiting): retry later", app.queue.depth());
            return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, msg));
        }
        waiting.push((name, answer));
    }
    // Queued: no longer on their way.
    drop(incoming);
    let mut rows = Vec::with_capacity(waiting.len());
    for (name, answer) in waiting {
        let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e);
        let row = answer.await.map_err(|_| internal("the executor stopped".into()))?.map_err(internal)?;
        rows.push((name, row));
    }
    Ok(rows)
}
