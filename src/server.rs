//! The accept loop: HTTP connections on a TCP listener until shutdown, then a
//! graceful close of every connection (a response in progress finishes).
//! Shared by the gateway (`App::serve`: HTTP/1.1) and the simulator
//! (`sim`: HTTP/1.1 and h2c).
//!
//! Written on hyper's and hyper-util's connection builders rather than
//! `axum::serve`, which cannot do either of two things relaygate needs:
//! - serve HTTP/1.1 without sniffing for the HTTP/2 preface. The sniff reads
//!   the first 24 bytes apart; hyper's read buffer then grows from 8 to
//!   16 KiB to take the rest of the request head and keeps that size for the
//!   life of the connection: 8 KiB more per open stream, for a protocol the
//!   OpenAI SDKs do not use in cleartext;
//! - lift hyper's limit of 200 concurrent HTTP/2 streams per connection (the
//!   simulator stands in for an inference server holding thousands).
//!
//! The gateway's connections also give up on a client that stops reading
//! (`SendTimeout`, below).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// How connections are served.
pub enum Protocol {
    /// HTTP/1.1 on hyper's own connection: what the gateway serves.
    /// hyper-util's auto builder, even limited to HTTP/1.1, wraps every
    /// connection's reads in its preface-sniffing `Rewind` (1.3 % of the
    /// instructions per request). The duration is `server.send_timeout`.
    Http1(hyper::server::conn::http1::Builder, Duration),
    /// Whatever the builder allows: the simulator's HTTP/1.1 and h2c.
    Auto(Builder<TokioExecutor>),
}

/// Serves `service` (a router, or a router inside server layers) until
/// `shutdown` completes, then stops accepting and returns once every
/// connection has closed gracefully.
pub async fn serve<S>(listener: TcpListener, service: S, protocol: Protocol, shutdown: impl Future<Output = ()>)
where
    S: tower::Service<http::Request<Incoming>, Response = Response<Body>, Error = std::convert::Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let service = TowerToHyperService::new(service);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    // Small SSE events must not wait for Nagle's algorithm.
                    let _ = tcp.set_nodelay(true);
                    let io = TokioIo::new(tcp);
                    match &protocol {
                        Protocol::Http1(builder, send_timeout) => {
                            let io = SendTimeout::new(io, *send_timeout);
                            tokio::spawn(graceful.watch(builder.serve_connection(io, service.clone())));
                        }
                        Protocol::Auto(builder) => {
                            tokio::spawn(graceful.watch(builder.serve_connection(io, service.clone()).into_owned()));
                        }
                    }
                }
                Err(e) => {
                    // Out of descriptors, say: back off instead of spinning.
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// HTTP/1.1 only: what the gateway serves.
pub fn http1(send_timeout: Duration) -> Protocol {
    Protocol::Http1(hyper::server::conn::http1::Builder::new(), send_timeout)
}

/// HTTP/1.1 and HTTP/2 with prior knowledge (h2c), without a limit on
/// concurrent streams (or with `max_streams`): what the simulator serves.
pub fn http1_and_h2c(max_streams: Option<u32>) -> Protocol {
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http2().max_concurrent_streams(max_streams);
    Protocol::Auto(builder)
}

/// A timer that runs only while something waits on a client: the first
/// `Pending` starts it, any progress drops it. So a connection or body that
/// is not stalled holds 8 bytes and never touches tokio's timer wheel (a
/// timer armed on every request cost about 1,400 instructions, 2 %).
pub(crate) struct Stall {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    pub(crate) fn new(limit: Duration) -> Self {
        Self { limit, timer: None }
    }

    /// The wait ended (data moved).
    pub(crate) fn progress(&mut self) {
        self.timer = None;
    }

    /// Still waiting: ready once `limit` has passed since the wait began.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let limit = self.limit;
        self.timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)))
            .as_mut()
            .poll(cx)
    }
}

/// A client connection that fails once a write has waited `timeout` for
/// room in the socket: the client stopped reading and its receive window is
/// full. hyper then closes the connection and drops the response, which
/// releases what the request held (its upstream connection, in-flight slot
/// and limits). Without it nothing did: hyper polls a response body only
/// when it can write, so a stream's idle and request deadlines, checked as
/// the body is polled, never fired for such a client. nginx's `send_timeout`
/// is the same idea (and the same default, 60 s).
struct SendTimeout {
    io: TokioIo<TcpStream>,
    stall: Stall,
}

impl SendTimeout {
    fn new(io: TokioIo<TcpStream>, timeout: Duration) -> Self {
        Self {
            io,
            stall: Stall::new(timeout),
        }
    }

    fn guard<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stall.progress();
            return poll;
        }
        match self.stall.poll_expired(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading (server.send_timeout)",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl hyper::rt::Read for SendTimeout {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for SendTimeout {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.guard(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.guard(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
