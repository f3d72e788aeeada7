//! The response cache's step on the request path (`cache`): a hit is
//! answered here, as the stored bytes; a miss goes on with its plan, which
//! stores the answer at the end (`handle`, and `stream::forward` for a
//! stream).

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

use super::handle::Proxied;
use super::record::RequestRecord;
use super::state::{AppState, Model};
use crate::cache::{self, Cache, Entry, Plan};
use crate::error::{GatewayError, TimeoutKind};
use crate::request::{Endpoint, ParsedRequest};

pub(super) enum Lookup {
    /// The model does not use the cache.
    Off,
    Hit(Proxied),
    /// Go upstream; the plan stores the answer.
    Miss((Arc<Cache>, Plan)),
}

/// Looks the request up. A plain miss may wait (up to `deadline`) for an
/// identical request in flight and be served from its answer.
#[allow(clippy::too_many_arguments)]
pub(super) async fn look_up(
    state: &AppState,
    model: &Model,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: &Bytes,
    parsed: &ParsedRequest,
    key: &str,
    deadline: Instant,
    record: &mut RequestRecord,
) -> Result<Lookup, GatewayError> {
    let (Some(cache), Some(policy), Some(counters)) = (state.cache(), &model.config.cache, &model.cache) else {
        return Ok(Lookup::Off);
    };
    let route = &model.route;
    // The key's targets, on the stack for up to 8 (no allocation per
    // request).
    let mut inline = [("", ""); 8];
    let spilled: Vec<(&str, &str)>;
    let targets: &[(&str, &str)] = if route.targets.len() <= inline.len() {
        for (slot, t) in inline.iter_mut().zip(&route.targets) {
            *slot = (&*t.upstream.name, t.model.as_str());
        }
        &inline[..route.targets.len()]
    } else {
        spilled = route
            .targets
            .iter()
            .map(|t| (&*t.upstream.name, t.model.as_str()))
            .collect();
        &spilled
    };
    let mut plan = cache.plan(&cache::Request {
        policy,
        client: key,
        endpoint: endpoint.upstream_path(),
        model: &route.label,
        counters,
        targets,
        stream: parsed.stream,
        embeddings: endpoint == Endpoint::Embeddings,
        headers,
        body,
    });
    let found = cache.lookup(&mut plan, parsed.stream, deadline).await;
    record.set_cache(plan.result);
    match found {
        Ok(None) => Ok(Lookup::Miss((cache.clone(), plan))),
        Ok(Some(entry)) => {
            // A client request all the same: key- and global-scope rules
            // count it; it buys no tokens and reaches no model or upstream.
            let limiter = state.limiter();
            if limiter.has_rules() {
                record.set_admission(limiter.admit_cache_hit(key).await?);
            }
            Ok(Lookup::Hit(serve_hit(cache, &entry, parsed, model, record)))
        }
        Err(()) => Err(GatewayError::UpstreamTimeout {
            upstream: route.targets[0].upstream.name.to_string(),
            kind: TimeoutKind::Request,
        }),
    }
}

/// A hit: the stored answer, a stream's usage chunk stripped unless the
/// client asked for usage (as on a miss).
fn serve_hit(
    cache: &Cache,
    entry: &Entry,
    parsed: &ParsedRequest,
    model: &Model,
    record: &mut RequestRecord,
) -> Proxied {
    let usage = entry.usage.unwrap_or_default();
    let saved = model.config.price.map_or(0.0, |p| usage.cost(&p));
    cache.metrics.served(&model.route.label, &usage, saved);
    record.served_from_cache(saved);
    let body = if entry.stream && parsed.inject_usage {
        crate::sse::strip_usage_only(entry.body.clone())
    } else {
        entry.body.clone()
    };
    let mut headers = HeaderMap::new();
    if let Some(ct) = entry
        .content_type
        .as_deref()
        .and_then(|ct| HeaderValue::from_str(ct).ok())
    {
        headers.insert(header::CONTENT_TYPE, ct);
    }
    headers.insert(header::AGE, HeaderValue::from(entry.age().as_secs()));
    Proxied::Full {
        status: StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK),
        headers,
        body,
        upstream: HeaderValue::from_static("cache"),
    }
}
