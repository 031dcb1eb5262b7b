//! An axum text-classification service whose requests go through an aqueduct flow.
//!
//! ```text
//! POST /classify   {"text": "..."}  ->  {"label": "sports", "scores": [...], "served_in_us": 812}
//! GET  /healthz    200 while the flow runs
//! ```
//!
//! Two steps: `Tokenize` (words hashed to ids, one request at a time) and `Model` (an embedding
//! bag and a linear layer over 4 classes, on batches of up to 16 requests, waiting at most 2 ms
//! for a batch to fill). `make example-axum` runs it on 127.0.0.1:8082 with worker threads;
//! `--processes` runs the steps in worker processes instead (this program re-executed).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use aqueduct::{BoxError, Flow, FlowError, FlowStep, Handler, ProcessOptions};
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

const VOCABULARY: usize = 4096;
const DIM: usize = 32;
const LABELS: [&str; 4] = ["world", "sports", "business", "science"];

/// What travels through the flow (serialisable for `--processes`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Request {
    text: String,
    tokens: Vec<u32>,
    scores: Vec<f32>,
}

#[derive(Clone)]
struct Tokenize;

impl Handler<Request> for Tokenize {
    fn handle(&mut self, batch: &mut [Request]) -> Result<(), BoxError> {
        for r in batch {
            if r.text.trim().is_empty() {
                return Err("empty text".into());
            }
            r.tokens = r
                .text
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .map(|w| {
                    let h =
                        w.to_lowercase().bytes().fold(2166136261u32, |h, b| (h ^ u32::from(b)).wrapping_mul(16777619));
                    h % VOCABULARY as u32
                })
                .collect();
        }
        Ok(())
    }
}

/// The "model": deterministic pseudo-random weights, built in `on_start` (in each worker).
#[derive(Clone, Default)]
struct Model {
    embeddings: Vec<f32>,
    classifier: Vec<f32>,
}

impl Handler<Request> for Model {
    fn on_start(&mut self) -> Result<(), BoxError> {
        let mut state = 42u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        self.embeddings = (0..VOCABULARY * DIM).map(|_| next()).collect();
        self.classifier = (0..DIM * LABELS.len()).map(|_| next()).collect();
        Ok(())
    }

    fn handle(&mut self, batch: &mut [Request]) -> Result<(), BoxError> {
        for r in batch {
            let mut bag = [0f32; DIM];
            for &t in &r.tokens {
                let row = &self.embeddings[t as usize * DIM..(t as usize + 1) * DIM];
                bag.iter_mut().zip(row).for_each(|(b, w)| *b += w);
            }
            let logits: Vec<f32> = (0..LABELS.len())
                .map(|c| bag.iter().zip(&self.classifier[c * DIM..(c + 1) * DIM]).map(|(x, w)| x * w).sum())
                .collect();
            let max = logits.iter().cloned().fold(f32::MIN, f32::max);
            let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f32 = exp.iter().sum();
            r.scores = exp.iter().map(|e| e / total).collect();
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct ClassifyRequest {
    text: String,
}

#[derive(Serialize)]
struct ClassifyResponse {
    label: &'static str,
    scores: Vec<f32>,
    served_in_us: u128,
}

async fn classify(
    State(flow): State<Flow<Request>>,
    Json(body): Json<ClassifyRequest>,
) -> Result<Json<ClassifyResponse>, (StatusCode, String)> {
    let t0 = Instant::now();
    let options = ProcessOptions { priority: 0, timeout: Some(Duration::from_secs(5)) };
    let done = flow.process_with(Request { text: body.text, ..Request::default() }, options).await.map_err(|e| {
        let status = match e {
            FlowError::Handler { .. } => StatusCode::BAD_REQUEST,
            FlowError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        (status, e.to_string())
    })?;
    let best = (0..LABELS.len()).max_by(|&a, &b| done.scores[a].total_cmp(&done.scores[b])).unwrap_or(0);
    Ok(Json(ClassifyResponse { label: LABELS[best], scores: done.scores, served_in_us: t0.elapsed().as_micros() }))
}

async fn healthz(State(flow): State<Flow<Request>>) -> StatusCode {
    if flow.is_running() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let processes = args.iter().any(|a| a == "--processes");
    let port = args.iter().position(|a| a == "--port").and_then(|i| args.get(i + 1)).map_or(Ok(8082), |p| p.parse())?;

    // Start the flow first: with --processes, each worker re-runs main up to this point.
    let builder = Flow::builder("classifier")
        .step(FlowStep::new(Tokenize))
        .step(FlowStep::new(Model::default()).batch_size(16).batch_timeout(Duration::from_millis(2)));
    let flow = if processes { builder.start_processes().await? } else { builder.start().await? };

    let app = Router::new().route("/classify", post(classify)).route("/healthz", get(healthz)).with_state(flow.clone());
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
    println!(
        "serving on http://{} ({})",
        listener.local_addr()?,
        if processes { "worker processes" } else { "worker threads" }
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    flow.stop().await;
    Ok(())
}
