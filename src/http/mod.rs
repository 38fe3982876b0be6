//! The HTTP edge: one file per surface, one router, one serve loop.

pub mod auth;
pub mod channels;
pub mod error;
pub mod feeds;
pub mod jobs;
pub mod ops;
pub mod ratelimit;
pub mod sse;
pub mod ui;
pub mod webhooks;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::hub::Hub;
use auth::{Auth, Principal};
use error::ApiError;
use ratelimit::RateLimiter;

/// The largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// How long a client may take to send a request body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct AppInner {
    pub hub: Arc<Hub>,
    pub auth: Auth,
    pub rate: RateLimiter,
    pub shutdown: CancellationToken,
    /// Long-lived connection tasks (WebSockets), awaited at shutdown.
    pub tasks: TaskTracker,
    pub max_subscriptions: usize,
    pub cors_origins: Vec<String>,
    pub jobs: crate::jobs::supervisor::Jobs,
    pub feeds: crate::feeds::poller::Feeds,
    pub webhooks: crate::webhooks::Webhooks,
}

#[derive(Clone)]
pub struct AppState(pub Arc<AppInner>);

impl std::ops::Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

/// The caller's identity, resolved from `Authorization` or `?token=`.
pub struct Caller(pub Principal);

impl<S> FromRequestParts<S> for Caller
where
    AppState: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let app = AppState::from_ref(state);
        let credential = auth::credential(parts);
        app.auth.principal(credential.as_deref()).map(Caller)
    }
}

/// The client's address, as the serve loop recorded it.
pub fn peer(parts_ext: &axum::http::Extensions) -> Option<SocketAddr> {
    parts_ext
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(a)| *a)
}

/// Reads a whole request body, refusing more than `MAX_BODY_BYTES` or a client that stalls.
pub async fn read_body(body: axum::body::Body) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    match tokio::time::timeout(BODY_TIMEOUT, limited.collect()).await {
        Err(_) => Err(ApiError::Timeout(
            "request body was not received in time".into(),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::TooLarge(
            format!("request body is over {MAX_BODY_BYTES} bytes"),
        )),
        Ok(Err(e)) => Err(ApiError::BadRequest(format!(
            "could not read request body: {e}"
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

pub fn router(state: AppState) -> Router {
    let cors = cors_layer(&state.cors_origins);
    Router::new()
        .route("/", get(ui::dashboard))
        .route("/channels/{ch}", get(ui::channel_page))
        .route("/runs/{id}", get(ui::run_page))
        .route("/tidings.js", get(ui::client))
        .route("/assets/{file}", get(ui::asset))
        .route("/healthz", get(ops::healthz))
        .route("/metrics", get(ops::metrics))
        .route("/ws", get(ws::upgrade))
        .route("/api/channels", get(channels::list))
        .route(
            "/api/channels/{ch}",
            get(channels::info).delete(channels::delete),
        )
        .route(
            "/api/channels/{ch}/messages",
            get(channels::read).post(channels::publish),
        )
        .route("/api/channels/{ch}/events", get(sse::events))
        .route("/api/jobs", get(jobs::list))
        .route(
            "/api/jobs/{name}/runs",
            get(jobs::runs_of_job).post(jobs::start),
        )
        .route(
            "/api/runs/{id}",
            get(jobs::get_run).delete(jobs::cancel_run),
        )
        .route("/api/feeds", get(feeds::list).post(feeds::add))
        .route("/api/feeds/{name}", axum::routing::delete(feeds::remove))
        .route("/api/webhooks", get(webhooks::list).post(webhooks::create))
        .route(
            "/api/webhooks/{id}",
            get(webhooks::get_one).delete(webhooks::remove),
        )
        .route("/api/webhooks/{id}/enable", post(webhooks::enable))
        .route("/api/webhooks/{id}/disable", post(webhooks::disable))
        .route("/api/webhooks/{id}/rotate", post(webhooks::rotate))
        .route("/api/webhooks/{id}/replay", post(webhooks::replay))
        .route("/api/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .method_not_allowed_fallback(error::method_not_allowed)
        .fallback(error::not_found)
        .layer(cors)
        .with_state(state)
}

fn cors_layer(origins: &[String]) -> CorsLayer {
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([axum::http::header::CONTENT_TYPE])
}

/// Is `origin` allowed by `cors_origins` (for the WebSocket `Origin` check)?
pub fn origin_allowed(origins: &[String], origin: Option<&str>) -> bool {
    match origin {
        None => true,
        Some(o) => origins.iter().any(|a| a == "*" || a == o),
    }
}

/// Serves `router` on `listener` until `shutdown` fires, then drains connections for at most
/// `grace`; who was still open then is logged and dropped.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(error) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(remote));
                router.clone().call(req)
            });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, %remote, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::debug!("all HTTP connections closed"),
        _ = tokio::time::sleep(grace) => tracing::warn!(?grace, "HTTP connections still open after the grace period; dropping them"),
    }
}
