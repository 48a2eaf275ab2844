//! `tether serve` as the connection gateway of a backend written in anything: the server API
//! under `/api/` and the event stream (`docs/API.md` is the reference).
//!
//! ```text
//!   clients ══tether══▶ Server ──next_event()──▶ serve loop ──record()──▶ Journal (ring)
//!                         ▲                                                  │ ids, gaps
//!   backend ──POST /api/clients/{id}/messages, /api/broadcast, /close──┐     ▼
//!           ◀─GET /api/events (SSE | NDJSON, Last-Event-ID) ◀──────────┼── readers
//!           ──GET /api/clients, /api/clients/{id} (status::api) ───────┘
//!   every /api/ route: auth::require (bearer token, or loopback only without one)
//!   HELLO ──▶ webhook::Webhook (optional, --auth-webhook) ──▶ allow | deny
//! ```
//!
//! What it deliberately does not do: keep events across a restart (the ring is memory; a
//! backend that reconnects to a new run gets a `gap` with reason `restart`), or wait for a
//! backend: client messages go into the ring whether or not anyone reads it, and the
//! ring's bounds decide how long they stay.

pub(crate) mod api;
pub(crate) mod auth;
pub(crate) mod event;
pub(crate) mod journal;
pub(crate) mod stream;
pub(crate) mod webhook;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use tether::ServerHandle;

use journal::Journal;

/// What the API routes share.
pub(crate) struct Gateway {
    pub(crate) handle: ServerHandle,
    pub(crate) journal: Arc<Journal>,
    /// Largest request body, in bytes.
    pub(crate) max_body: usize,
    /// A request body must arrive within this.
    pub(crate) body_deadline: Duration,
    /// An idle event stream sends a keep-alive this often.
    pub(crate) keepalive: Duration,
    /// With `--cluster`: routes sends, closes and broadcasts to the other nodes.
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// The gateway's own routes (the read side, `/api/clients`, is in `status::api`).
pub(crate) fn routes(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/api/clients/{id}/messages", post(api::send))
        .route("/api/clients/{id}/close", post(api::close))
        .route("/api/broadcast", post(api::broadcast))
        .route("/api/events", get(api::events))
        .with_state(gw)
}

/// Without an HTTP token: every `/api/` route answers loopback peers only.
pub(crate) fn loopback_only(api: Router) -> Router {
    api.route_layer(axum::middleware::from_fn(auth::loopback_only))
}
