//! The gateway's client connections: HTTP/1.1 on hyper's connection API,
//! accepted by `net::accept`.
//!
//! Written on hyper's connection builder rather than `axum::serve`, which
//! cannot serve HTTP/1.1 without sniffing for the HTTP/2 preface. The sniff
//! reads the first 24 bytes apart; hyper's read buffer then grows from 8 to
//! 16 KiB to take the rest of the request head and keeps that size for the
//! life of the connection: 8 KiB more per open stream, for a protocol the
//! OpenAI SDKs do not use in cleartext.
//!
//! The gateway's connections also have the timeouts hyper's builder offers
//! only with a timer armed for every request (`ClientIo`, below): a request
//! head must arrive within `server.header_read_timeout` once begun, an idle
//! connection closes after `server.keepalive_timeout`, and a client that
//! stops reading is cut off after `server.send_timeout`.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use prometheus::{IntCounter, IntGauge};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use crate::config::ServerConfig;
use crate::error::GatewayError;
use crate::net::Stall;
use crate::telemetry::metrics::{Metrics, TIMEOUT_KINDS};

/// Serves `service` (the routes inside the server layers) on HTTP/1.1 until
/// `shutdown` completes, then stops accepting and returns once every
/// connection has closed gracefully. hyper's own HTTP/1.1 connection, not
/// hyper-util's auto builder: that one, even limited to HTTP/1.1, wraps every
/// connection's reads in its preface-sniffing `Rewind` (1.3 % of the
/// instructions per request).
pub async fn serve<S>(listener: TcpListener, service: S, limits: ClientLimits, shutdown: impl Future<Output = ()>)
where
    S: tower::Service<http::Request<Incoming>, Response = Response<Body>, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let builder = hyper::server::conn::http1::Builder::new();
    let limits = Arc::new(limits);
    let service = TowerToHyperService::new(service);
    crate::net::accept(listener, shutdown, |io, graceful| {
        let busy = Arc::new(AtomicUsize::new(0));
        let io = ClientIo::new(io, limits.clone(), busy.clone());
        let service = Tracked {
            service: service.clone(),
            busy,
        };
        tokio::spawn(graceful.watch(builder.serve_connection(io, service)));
    })
    .await;
}

/// Why a client connection was closed on a timeout, in the order of
/// `TIMEOUT_KINDS`.
#[derive(Clone, Copy)]
enum Closed {
    Header,
    Keepalive,
    Send,
}

/// The gateway's limits on client connections (`server.*`), and the metric
/// handles that count what they do, resolved once.
pub struct ClientLimits {
    header_read: Duration,
    keepalive: Duration,
    send: Duration,
    connections: IntGauge,
    /// Indexed by `Closed`.
    timeouts: [IntCounter; 3],
}

impl ClientLimits {
    pub fn new(config: &ServerConfig, metrics: &Metrics) -> Self {
        Self {
            header_read: config.header_read_timeout,
            keepalive: config.keepalive_timeout,
            send: config.send_timeout,
            connections: metrics.client_connections.clone(),
            timeouts: TIMEOUT_KINDS.map(|kind| metrics.client_timeouts.with_label_values(&[kind])),
        }
    }

    fn count(&self, closed: Closed) {
        self.timeouts[closed as usize].inc();
    }
}

/// Where a client connection is, as far as its read timeouts go. While a
/// request is being served (see `Tracked`) none applies: its body has
/// `request_body_timeout`, its answer `send_timeout` and the upstream
/// deadlines.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing of the next request read, since the connection was accepted
    /// or since its last answer: `keepalive`, then a silent close. A new
    /// connection counts as idle (as in Envoy; nginx gives it the header
    /// timeout), so that a client's pre-opened connection is not cut short.
    Idle,
    /// Part of a request head read: `header_read` from the first wait after
    /// it began, not restarted by each byte (a client trickling its head
    /// gains nothing), then a 408.
    Head,
}

/// A gateway client connection with its timeouts.
///
/// hyper also reads while it writes an answer (to see a client leave), so
/// reads cannot tell a request in progress from an idle connection; the
/// counter that `Tracked` keeps can (from the service call until hyper
/// drops the response body). After an answer hyper does not read again
/// until bytes arrive, so the connection becomes idle on the write side, at
/// the flush of the answer's last bytes.
///
/// One timer per connection, created at its first use. An answer does not
/// move it: it only notes when the connection went idle, and a timer that
/// fires early (a request came and went meanwhile) is set again from that
/// instant. A timer moved or re-armed for every request (a box and two
/// trips through tokio's timer wheel, or a reset and a poll) measured 900
/// to 1,400 instructions, 1 to 2 % of a request.
struct ClientIo {
    io: TokioIo<TcpStream>,
    limits: Arc<ClientLimits>,
    busy: Arc<AtomicUsize>,
    phase: Phase,
    /// In `Head`: the timer holds the head's deadline.
    head_deadline_set: bool,
    /// In `Idle`: since when.
    idle_since: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    /// Bytes written since the connection was last made idle: an answer.
    /// (hyper flushes on every turn, with or without anything written.)
    wrote: bool,
    send: Stall,
}

impl ClientIo {
    fn new(io: TokioIo<TcpStream>, limits: Arc<ClientLimits>, busy: Arc<AtomicUsize>) -> Self {
        limits.connections.inc();
        Self {
            io,
            send: Stall::new(limits.send),
            limits,
            busy,
            phase: Phase::Idle,
            head_deadline_set: false,
            idle_since: Instant::now(),
            timer: None,
            wrote: false,
        }
    }

    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }

    /// Sets the timer to `deadline` and polls it, which registers this task
    /// to be woken then.
    fn poll_timer_until(&mut self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let timer = match &mut self.timer {
            Some(timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => self.timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        timer.as_mut().poll(cx)
    }

    /// After a write or flush: once an answer was written and is complete
    /// (its body dropped), the connection is idle. The timer is left alone
    /// unless it holds a head's deadline or has already fired.
    fn after_write(&mut self, cx: &mut Context<'_>) {
        if !self.wrote || self.is_busy() {
            return;
        }
        self.wrote = false;
        self.phase = Phase::Idle;
        self.idle_since = Instant::now();
        let rearm = match &self.timer {
            Some(timer) => self.head_deadline_set || timer.is_elapsed(),
            None => true,
        };
        self.head_deadline_set = false;
        if rearm {
            // A deadline in the future: not ready.
            let _ = self.poll_timer_until(cx, self.idle_since + self.limits.keepalive);
        }
    }

    /// A read waits: ready once the current phase's time is up.
    fn poll_read_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.phase == Phase::Idle {
            if let Some(timer) = &mut self.timer {
                ready!(timer.as_mut().poll(cx));
            }
            // The timer fired, or there was none: idle long enough?
            let deadline = self.idle_since + self.limits.keepalive;
            if Instant::now() >= deadline {
                return Poll::Ready(());
            }
            return self.poll_timer_until(cx, deadline);
        }
        if !self.head_deadline_set {
            self.head_deadline_set = true;
            return self.poll_timer_until(cx, Instant::now() + self.limits.header_read);
        }
        match &mut self.timer {
            Some(timer) => timer.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }

    /// A read timeout fired: counted, and for a partial request head a 408
    /// in OpenAI's shape, written if the socket takes it at once (it does:
    /// the client has no answer left to read). hyper then closes the
    /// connection on the error.
    fn read_timed_out(&mut self, cx: &mut Context<'_>) -> io::Error {
        let what = match self.phase {
            Phase::Idle => {
                self.limits.count(Closed::Keepalive);
                "the connection was idle (server.keepalive_timeout)"
            }
            Phase::Head => {
                self.limits.count(Closed::Header);
                let answer = header_timeout_answer(self.limits.header_read);
                let _ = hyper::rt::Write::poll_write(Pin::new(&mut self.io), cx, &answer);
                "the request head did not arrive (server.header_read_timeout)"
            }
        };
        tracing::debug!("closing a client connection: {what}");
        io::Error::new(io::ErrorKind::TimedOut, what)
    }

    fn guard_write<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if let Some(written) = ready!(self.send.watch(cx, poll)) {
            self.wrote = true;
            self.after_write(cx);
            return Poll::Ready(written);
        }
        self.limits.count(Closed::Send);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client stopped reading (server.send_timeout)",
        )))
    }
}

impl Drop for ClientIo {
    fn drop(&mut self) {
        self.limits.connections.dec();
    }
}

/// The whole answer to a request head that timed out: there is no request
/// for hyper to answer, so the connection writes it itself.
fn header_timeout_answer(after: Duration) -> Vec<u8> {
    let body = GatewayError::RequestHeaderTimeout { after }.body();
    let mut answer = format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    answer
}

impl hyper::rt::Read for ClientIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let poll = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.is_busy() {
            return poll;
        }
        match poll {
            Poll::Pending => {
                ready!(this.poll_read_deadline(cx));
                Poll::Ready(Err(this.read_timed_out(cx)))
            }
            // Bytes (or the end of the stream, after which hyper closes):
            // a head has begun.
            Poll::Ready(Ok(())) => {
                if this.phase == Phase::Idle {
                    this.phase = Phase::Head;
                    this.head_deadline_set = false;
                }
                poll
            }
            Poll::Ready(Err(_)) => poll,
        }
    }
}

impl hyper::rt::Write for ClientIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.guard_write(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.guard_write(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        if poll.is_ready() {
            self.after_write(cx);
        }
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One request in progress on a connection, from the service call until
/// hyper drops the response body (its last byte written, or the connection
/// gone).
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(busy: &Arc<AtomicUsize>) -> Self {
        busy.fetch_add(1, Ordering::Relaxed);
        Self(busy.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The gateway's service on one connection: marks the connection busy for
/// as long as each request's answer is being written.
struct Tracked<S> {
    service: S,
    busy: Arc<AtomicUsize>,
}

impl<S> hyper::service::Service<http::Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = Response<Body>>,
{
    type Response = Response<TrackedBody>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        TrackedFuture {
            busy: Some(Busy::new(&self.busy)),
            inner: self.service.call(request),
        }
    }
}

pin_project_lite::pin_project! {
    struct TrackedFuture<F> {
        #[pin]
        inner: F,
        busy: Option<Busy>,
    }
}

impl<F, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<TrackedBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let busy = this.busy.take();
        Poll::Ready(result.map(|response| response.map(|body| TrackedBody { body, _busy: busy })))
    }
}

/// A response body that keeps its connection marked busy until dropped.
struct TrackedBody {
    body: Body,
    _busy: Option<Busy>,
}

impl hyper::body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
