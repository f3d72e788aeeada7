//! The path of one proxied request, in order:
//!
//! 1. auth: the client key, before the body is read;
//! 2. body: `Content-Length` checked against `max_body_bytes` before reading,
//!    and the stream counted while reading (chunked bodies);
//! 3. parse once (`request::parse`): `model`, `stream`, `messages`;
//! 4. route: the model's first target by priority;
//! 5. the upstream attempt (`Upstream::send`) under the first-byte and total
//!    deadlines;
//! 6. the reply: a buffered body, or a stream forwarded event by event
//!    (`streaming::forward`) under the idle and total deadlines.
//!
//! The `RequestRecord` follows the request to its end (into the stream body
//! for streams) and records metrics and the access log exactly once.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, StatusCode};
use http_body_util::{BodyExt, Limited};
use tokio::time::Instant;
use tower_http::request_id::RequestId;

use crate::app::{AppState, Runtime};
use crate::error::{clip, GatewayError};
use crate::metrics::{ErrorType, Outcome};
use crate::observe::RequestRecord;
use crate::request::{self, Endpoint};
use crate::streaming::{self, SseReader};
use crate::upstream::{forwardable_headers, Attempt, Reply};

/// Names the upstream that answered, for debugging through a chain of proxies.
static UPSTREAM_HEADER: HeaderName = HeaderName::from_static("x-relaygate-upstream");

pub async fn handle(state: AppState, endpoint: Endpoint, req: Request) -> Response {
    let started = Instant::now();
    let runtime = state.runtime();
    let request_id = req.extensions().get::<RequestId>().map(|id| id.header_value().clone());
    let mut record = RequestRecord::new(state.metrics().clone(), started, request_id);
    if state.is_draining() {
        // Connections kept alive from before the drain may still send requests.
        // They are served: the drain is bounded by shutdown_grace anyway.
        tracing::debug!("request during drain");
    }
    let result = run(&runtime, endpoint, req, &mut record, started).await;
    // Everything up to here that was not spent waiting on the upstream is
    // relaygate's own time (for streams: up to the first event).
    state
        .metrics()
        .overhead
        .observe(started.elapsed().saturating_sub(record.upstream_wait()).as_secs_f64());
    match result {
        Ok(Proxied::Full {
            status,
            mut headers,
            body,
            upstream,
        }) => {
            record.finish(status.as_u16(), Outcome::of_status(status.as_u16()), None);
            headers.insert(UPSTREAM_HEADER.clone(), upstream);
            let mut response = (status, body).into_response();
            response.headers_mut().extend(headers);
            response
        }
        Ok(Proxied::Stream {
            status,
            mut headers,
            first,
            reader,
            idle,
            deadline,
            upstream,
        }) => {
            let body = streaming::forward(reader, first, idle, deadline, record);
            headers.insert(UPSTREAM_HEADER.clone(), upstream);
            let mut response = Response::new(body);
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            response
        }
        Err(error) => {
            record.finish(error.status().as_u16(), error.outcome(), Some(error.code()));
            error.into_response()
        }
    }
}

enum Proxied {
    Full {
        status: StatusCode,
        headers: http::HeaderMap,
        body: Bytes,
        upstream: HeaderValue,
    },
    Stream {
        status: StatusCode,
        headers: http::HeaderMap,
        first: Bytes,
        reader: SseReader,
        idle: Duration,
        deadline: Instant,
        upstream: HeaderValue,
    },
}

async fn run(
    runtime: &Arc<Runtime>,
    endpoint: Endpoint,
    req: Request,
    record: &mut RequestRecord,
    started: Instant,
) -> Result<Proxied, GatewayError> {
    let (parts, body) = req.into_parts();
    record.set_key(runtime.keys.authenticate(&parts.headers)?);

    let limit = runtime.config.server.max_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    let body = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                GatewayError::PayloadTooLarge { limit }
            } else {
                GatewayError::InvalidRequest("The request body could not be read.".into())
            }
        })?
        .to_bytes();

    let parsed = request::parse(endpoint, &body)?;
    let model_index = *runtime
        .models
        .get(&parsed.model)
        .ok_or_else(|| GatewayError::ModelNotFound(clip(&parsed.model)))?;
    let model = &runtime.config.models[model_index];
    record.set_model(runtime.model_labels[model_index].clone(), model.price, parsed.stream);

    let target = &model.targets[0];
    let upstream = &runtime.upstreams[target.upstream];
    let deadline = started + upstream.config.request_timeout;
    let attempt = Attempt {
        endpoint,
        body: parsed.body_for(&body, &target.model),
        headers: forwardable_headers(&parts.headers),
        stream: parsed.stream,
        deadline,
    };
    let upstream_label = HeaderValue::from_str(&upstream.name).unwrap_or(HeaderValue::from_static("-"));

    record.start_attempt(upstream.name.clone());
    let sent = Instant::now();
    let reply = upstream.send(attempt, runtime.config.server.max_response_bytes).await;
    record.add_upstream_wait(sent.elapsed());
    match reply {
        Err(e) => {
            record.end_attempt(e.status, e.error_type);
            Err(e.error)
        }
        Ok(Reply::Full {
            status,
            headers,
            body,
            usage,
        }) => {
            record.end_attempt(Some(status.as_u16()), ErrorType::of_status(status.as_u16()));
            record.set_usage(usage);
            Ok(Proxied::Full {
                status,
                headers,
                body,
                upstream: upstream_label,
            })
        }
        Ok(Reply::Stream {
            status,
            headers,
            first,
            reader,
        }) => {
            record.first_token();
            Ok(Proxied::Stream {
                status,
                headers,
                first,
                reader,
                idle: upstream.config.idle_timeout,
                deadline,
                upstream: upstream_label,
            })
        }
    }
}
