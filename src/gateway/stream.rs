//! The client's body for a committed stream: the events the upstream sends,
//! forwarded in whole batches (`sse::SseReader`) under the idle and total
//! deadlines, ending with one SSE error event if the stream breaks.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use tokio::time::Instant;

use crate::cache::Capture;
use crate::error::{GatewayError, TimeoutKind};
use crate::gateway::record::RequestRecord;
use crate::sse::{strip_usage_only, ReadError, SseReader};

/// The client's response body for a stream whose first batch has already
/// been read. Every later batch must arrive within `idle` of the previous
/// one, and the whole stream within `deadline`. Any failure ends the body
/// with one SSE error event and no `[DONE]`.
pub fn forward(
    reader: SseReader,
    first: Bytes,
    idle: Duration,
    deadline: Instant,
    strip_usage: bool,
    record: RequestRecord,
    capture: Option<Capture>,
) -> Body {
    struct State {
        reader: SseReader,
        /// The response cache's copy of the stream, stored at a clean end.
        capture: Option<Capture>,
        pending: Option<Bytes>,
        idle: Duration,
        deadline: Instant,
        strip_usage: bool,
        /// A Responses API stream: its own end event and error shape.
        responses: bool,
        upstream: String,
        record: Option<RequestRecord>,
    }
    // Boxed: `unfold` moves its state in and out of each step's future,
    // and the state (the request record above all) is several hundred bytes.
    let state = Box::new(State {
        reader,
        capture,
        pending: Some(first),
        idle,
        deadline,
        strip_usage,
        responses: record.endpoint().is_responses(),
        upstream: record.upstream_name(),
        record: Some(record),
    });
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            let record = st.record.as_mut()?;
            let next = match st.pending.take() {
                Some(first) => Ok(Ok(Some(first))),
                None => {
                    let idle_at = (Instant::now() + st.idle).min(st.deadline);
                    tokio::time::timeout_at(idle_at, st.reader.next_batch())
                        .await
                        .map_err(|_| idle_at)
                }
            };
            let error = match next {
                Ok(Ok(Some(batch))) => {
                    record.on_stream_batch(&batch);
                    if let Some(capture) = st.capture.as_mut() {
                        capture.push(&batch);
                    }
                    let batch = if st.strip_usage { strip_usage_only(batch) } else { batch };
                    if batch.is_empty() {
                        continue; // it held only the injected usage chunk
                    }
                    return Some((Ok::<_, Infallible>(batch), st));
                }
                Ok(Ok(None)) if record.saw_done() => {
                    if let Some(capture) = st.capture.take() {
                        capture.finish(record.upstream_usage());
                    }
                    st.record.take()?.finish_stream(None);
                    return None;
                }
                Ok(Ok(None)) | Ok(Err(ReadError::Truncated)) => GatewayError::UpstreamMalformed {
                    upstream: st.upstream.clone(),
                    detail: if st.responses {
                        "the stream ended without its final response event"
                    } else {
                        "the stream ended without [DONE]"
                    },
                },
                Ok(Err(ReadError::EventTooLarge)) => GatewayError::UpstreamMalformed {
                    upstream: st.upstream.clone(),
                    detail: "an SSE event exceeded 1 MiB",
                },
                Ok(Err(ReadError::Reset)) => GatewayError::UpstreamReset {
                    upstream: st.upstream.clone(),
                },
                Err(idle_at) => GatewayError::UpstreamTimeout {
                    upstream: st.upstream.clone(),
                    kind: if idle_at < st.deadline {
                        TimeoutKind::Idle
                    } else {
                        TimeoutKind::Request
                    },
                },
            };
            let event = if st.responses {
                error.responses_sse_event()
            } else {
                error.sse_event()
            };
            st.record.take()?.finish_stream(Some(&error));
            return Some((Ok(event), st));
        }
    });
    Body::from_stream(stream)
}
