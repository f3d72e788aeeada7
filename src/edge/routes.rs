//! The HTTP surface. Handlers are thin: the proxied path is `gateway::handle`.
//!
//! Server layers, outermost first:
//! 1. `SetRequestId`: takes the client's `x-request-id` or makes one;
//! 2. `PropagateRequestId`: returns it on every response;
//! 3. `Routes`: `POST /v1/{chat/completions,completions,embeddings,responses}`
//!    to `gateway::handle`; the Responses API's stored responses
//!    (`/v1/responses/{id}…`) and, when `[passthrough]` is on, the other
//!    `/v1/*` paths it covers to `gateway::passthrough`; everything else to
//!    the router: `/v1/models`, `/v1/models/{id}`, `/health*`, `/metrics`,
//!    `/admin/*`, the status page (`/`, `/status*`), and a fallback that
//!    answers unknown paths (and other methods on the proxied ones) with
//!    OpenAI-shaped 404s.
//!
//! The layers wrap the router from outside (`service`), not through
//! `Router::layer`, which wraps every route in its own boxed service: one
//! more allocation and routing level per request. `Routes` skips the router
//! for the proxied requests: its path lookup, method routing and futures
//! were 3-4 % of their instructions.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use axum::routing::get;
use axum::Router;
use futures_util::future::Either;
use http::HeaderName;
use tower::util::MapRequest;
use tower::ServiceBuilder;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestId, PropagateRequestIdLayer, RequestId, SetRequestId, SetRequestIdLayer,
};

use crate::edge::health;
use crate::error::GatewayError;
use crate::gateway::state::AppState;
use crate::gateway::{handle, passthrough};
use crate::request::Endpoint;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The routes wrapped in the server layers: what `server::serve` serves.
pub type Service = MapRequest<SetRequestId<PropagateRequestId<Routes>, MakeId>, fn(Req) -> Req>;
type Req = http::Request<hyper::body::Incoming>;

pub fn service(state: AppState) -> Service {
    ServiceBuilder::new()
        .map_request(drop_unsafe_request_id as fn(Req) -> Req)
        .layer(SetRequestIdLayer::new(X_REQUEST_ID.clone(), MakeId))
        .layer(PropagateRequestIdLayer::new(X_REQUEST_ID.clone()))
        .service(Routes {
            router: router(state.clone()),
            state,
        })
}

/// The proxied POSTs directly, the rest through the router.
#[derive(Clone)]
pub struct Routes {
    state: AppState,
    router: Router,
}

type Proxied = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl tower::Service<Req> for Routes {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Proxied, RouteFuture<Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let endpoint = match (req.method(), req.uri().path()) {
            (&Method::POST, "/v1/chat/completions") => Endpoint::ChatCompletions,
            (&Method::POST, "/v1/completions") => Endpoint::Completions,
            (&Method::POST, "/v1/embeddings") => Endpoint::Embeddings,
            (&Method::POST, "/v1/responses") => Endpoint::Responses,
            (_, path) if self.passes_through(path) => {
                let state = self.state.clone();
                return Either::Left(Box::pin(async move {
                    Ok(passthrough::handle(state, req.map(axum::body::Body::new)).await)
                }));
            }
            _ => return Either::Right(self.router.call(req)),
        };
        let state = self.state.clone();
        Either::Left(Box::pin(async move {
            Ok(handle::handle(state, endpoint, req.map(axum::body::Body::new)).await)
        }))
    }
}

impl Routes {
    /// The stored-response calls, and the paths `[passthrough]` covers
    /// that relaygate does not serve itself (`/v1/models` and below are
    /// the router's: it answers configured models and passes the rest).
    fn passes_through(&self, path: &str) -> bool {
        if passthrough::is_stored_response(path) {
            return true;
        }
        if path == "/v1/models" || path.starts_with("/v1/models/") {
            return false;
        }
        self.state
            .runtime()
            .config
            .passthrough
            .as_ref()
            .is_some_and(|p| p.covers(path))
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        // The proxied POSTs never get here (`Routes`); other methods on
        // their paths fall through to the 404 like any unknown route.
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", axum::routing::any(model))
        .route("/health", get(health::summary))
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(metrics))
        .merge(crate::edge::admin::router(state.clone()))
        .merge(crate::edge::status::router())
        .fallback(not_found)
        .method_not_allowed_fallback(not_found)
        .with_state(state)
}

/// Answered from the config, in OpenAI's list format; needs a client key
/// like every `/v1` endpoint.
async fn models(State(state): State<AppState>, req: Request) -> Response {
    let runtime = state.runtime();
    if let Err(e) = runtime.keys.authenticate(req.headers()) {
        return e.into_response();
    }
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        runtime.models_json.clone(),
    )
        .into_response()
}

/// One model: a configured one answered here in OpenAI's shape; any other
/// passed through when `[passthrough]` covers the path, else a 404.
async fn model(State(state): State<AppState>, req: Request) -> Response {
    let runtime = state.runtime();
    let path = req.uri().path();
    let id = path.strip_prefix("/v1/models/").unwrap_or_default();
    let passes = runtime.config.passthrough.as_ref().is_some_and(|p| p.covers(path));
    if req.method() == Method::GET {
        if let Some(m) = runtime.model(id) {
            if let Err(e) = runtime.keys.authenticate(req.headers()) {
                return e.into_response();
            }
            return axum::Json(serde_json::json!({
                "id": m.config.name,
                "object": "model",
                "created": runtime.models_created,
                "owned_by": "relaygate",
            }))
            .into_response();
        }
    }
    if passes {
        return passthrough::handle(state.clone(), req).await;
    }
    if let Err(e) = runtime.keys.authenticate(req.headers()) {
        return e.into_response();
    }
    GatewayError::ModelNotFound(crate::error::clip(id)).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    // Routing estimates decay with time: set as of this scrape.
    for model in &state.runtime().models {
        model.route.export_loads();
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics().render(),
    )
        .into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    GatewayError::NotFound {
        method: method.to_string(),
        path: crate::error::clip(uri.path()),
    }
    .into_response()
}

/// A client-sent `x-request-id` is kept only when it is a short token of
/// `[A-Za-z0-9._:-]`, so clients cannot feed arbitrary data into logs and
/// upstream headers; otherwise a fresh id replaces it.
fn drop_unsafe_request_id<B>(mut req: http::Request<B>) -> http::Request<B> {
    let unsafe_id = req.headers().get(&X_REQUEST_ID).is_some_and(|v| {
        let b = v.as_bytes();
        b.is_empty()
            || b.len() > 128
            || !b
                .iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
    });
    if unsafe_id {
        req.headers_mut().remove(&X_REQUEST_ID);
    }
    req
}

/// Request ids: 16 random bytes as hex, like OpenAI's `req_…` ids but
/// without a UUID dependency. Hex-encoded by hand: this runs per request and
/// `format!` showed in the profile.
#[derive(Clone, Copy)]
pub struct MakeId;

impl MakeRequestId for MakeId {
    fn make_request_id<B>(&mut self, _request: &http::Request<B>) -> Option<RequestId> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut id = *b"req_00000000000000000000000000000000";
        let random = fastrand::u128(..);
        for (i, c) in id[4..].iter_mut().enumerate() {
            *c = HEX[((random >> (124 - 4 * i)) & 0xf) as usize];
        }
        HeaderValue::from_bytes(&id).ok().map(RequestId::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_req_and_32_hex_digits() {
        let request = http::Request::new(());
        let ids: Vec<String> = (0..100)
            .map(|_| {
                let id = MakeId.make_request_id(&request).unwrap();
                id.header_value().to_str().unwrap().to_owned()
            })
            .collect();
        for id in &ids {
            assert_eq!(id.len(), 36, "{id}");
            assert!(id.starts_with("req_"), "{id}");
            assert!(
                id[4..]
                    .bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
                "{id}"
            );
        }
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        // Every digit position takes several values (the shift covers all 128 bits).
        for pos in 4..36 {
            let values: std::collections::HashSet<u8> = ids.iter().map(|id| id.as_bytes()[pos]).collect();
            assert!(values.len() > 4, "position {pos} is stuck: {values:?}");
        }
    }
}
