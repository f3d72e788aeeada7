//! Connections to one upstream: idle HTTP/1.1 connections kept between
//! requests, or HTTP/2 connections shared by many.
//!
//! Written on hyper's connection API instead of hyper-util's legacy client.
//! That client, for every request, raced a pool checkout against a lazily
//! built connect future, hashed the pool key under one mutex for all hosts
//! and spawned a task to put the HTTP/1.1 connection back (11.7 % of the
//! instructions per request, docs/performance.md); and it never opens a
//! second HTTP/2 connection when the first is at the server's stream limit
//! (hyperium/hyper#3623), so a request past the limit waited for a stream
//! to end. Here:
//! - HTTP/1.1: a stack of idle connections, most recently used on top. A
//!   connection goes back when its response body has been read to the end;
//!   a body dropped earlier closes it (the rest of it is never read).
//! - HTTP/2: each connection carries at most the server's
//!   `SETTINGS_MAX_CONCURRENT_STREAMS` requests, and at most 1,024; when all
//!   are full a new one opens. A connection's flow-control window is the
//!   sum of its streams' (1 MiB each), so streams whose clients stopped
//!   reading hold at most their own window and never stall the others.
//!   Opening is serialised, so a burst at a cold pool opens one
//!   connection, not one per request. Until the server's SETTINGS arrive
//!   (a round trip after the connection opens) a new connection is assumed
//!   to take 100 streams, h2's default and the minimum RFC 9113
//!   recommends; with a server that allows fewer, a request in a burst on a
//!   brand-new connection can wait behind its limit.
//! - A request that a reused connection could not send (it closed under
//!   us) goes out on another. One that was sent is never repeated here:
//!   that is the retry policy's call.
//! - Connections idle for `IDLE_TIMEOUT` are closed by a sweeper task that
//!   ends with the pool.
//! - Redirects are answers like any other: nothing here follows one (that
//!   would send the upstream key to whatever host a `Location` names).
//!
//! The two locks are per upstream and held for a push or a pop.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
// tokio's clock, so that tests can move it (the idle sweep).
use tokio::time::Instant;

use crate::config::{HttpVersion, UpstreamConfig};

/// How long a connection may sit unused before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle HTTP/1.1 connections kept per upstream; more are closed on return.
const MAX_IDLE: usize = 1024;
/// How often the sweeper looks for expired connections.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// HTTP/2 flow control. A stream whose client stopped reading holds at most
/// this much unread answer in relaygate (hyper's default is 2 MiB); 1 MiB
/// per round trip still carries 20 MB/s at 50 ms.
const H2_STREAM_WINDOW: u32 = 1024 * 1024;
/// Streams per HTTP/2 connection at most, whatever the server allows. The
/// connection's window is all of their stream windows (1 GiB; h2 allows
/// 2 GiB), so streams that stop reading can never use it up and starve
/// the others on the connection (with hyper's defaults, 2 MiB streams in a
/// 5 MiB connection window, three did). It only bounds that credit: memory
/// is bounded per stream. (A cap of 100 measured about 2 KiB more per open
/// stream: eleven connections instead of one for 1,050 streams to a server
/// without a limit.)
const H2_MAX_STREAMS: usize = 1024;

/// A connection's byte stream, plain or TLS, behind a pointer: hyper sizes
/// every task it spawns for an HTTP/2 stream by its largest variant, the
/// connection with its transport inline, and a TLS session inline is large.
/// Each kind is boxed as itself, not as one plain-or-TLS enum, so that a
/// plain connection holds 32 bytes here rather than a TLS session's 1 KiB
/// (one per concurrent stream with HTTP/1.1).
type Io = Box<dyn Transport>;

trait Transport: hyper::rt::Read + hyper::rt::Write + Send + Unpin {
    /// Whether the server chose h2 by ALPN (TLS only).
    fn alpn_h2(&self) -> bool;
}

impl Transport for TokioIo<TcpStream> {
    fn alpn_h2(&self) -> bool {
        false
    }
}

impl Transport for TokioIo<TlsStream<TcpStream>> {
    fn alpn_h2(&self) -> bool {
        self.inner().get_ref().1.alpn_protocol() == Some(b"h2")
    }
}
type H1 = http1::SendRequest<OutBody>;

/// A request's body upstream: buffered (every routed request), or the
/// client's body as it arrives (the pass-through, `gateway::passthrough`).
/// An enum of our own rather than http-body-util's `Either`: that one's
/// boxed error type trips rustc's higher-ranked check where the connection
/// task is spawned.
pub enum OutBody {
    Full(Full<Bytes>),
    Stream(Pin<Box<dyn hyper::body::Body<Data = Bytes, Error = BodyFailed> + Send>>),
}

/// The client's body failed on its way upstream (it broke off, paused too
/// long or went over the limit); the upstream exchange is abandoned.
#[derive(Debug, thiserror::Error)]
#[error("the request body failed: {0}")]
pub struct BodyFailed(pub &'static str);

impl From<Bytes> for OutBody {
    fn from(bytes: Bytes) -> Self {
        OutBody::Full(Full::new(bytes))
    }
}

impl hyper::body::Body for OutBody {
    type Data = Bytes;
    type Error = BodyFailed;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyFailed>>> {
        match self.get_mut() {
            OutBody::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(|e| match e {}))),
            OutBody::Stream(body) => body.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Full(full) => full.is_end_stream(),
            OutBody::Stream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Full(full) => full.size_hint(),
            OutBody::Stream(body) => body.size_hint(),
        }
    }
}

/// A request that got no response, with the request itself when none of
/// it was written: the caller may send it again, body and all. Boxed: the
/// rare case should not make every request's future larger.
pub struct Unsent {
    pub error: SendError,
    pub request: Option<Box<Request<OutBody>>>,
}

/// Why a request got no response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection: DNS, TCP, TLS or the HTTP/2 handshake failed or timed out.
    #[error("connect")]
    Connect(#[source] Box<dyn StdError + Send + Sync>),
    /// The connection failed while the request was out.
    #[error("send")]
    Send(#[source] hyper::Error),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    host: String,
    port: u16,
    /// `Host` for HTTP/1.1 requests, made once (HTTP/2 sends `:authority`).
    host_header: HeaderValue,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    version: HttpVersion,
    connect_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
    h2: Mutex<Vec<H2>>,
    /// Held while an HTTP/2 connection opens.
    h2_opening: tokio::sync::Mutex<()>,
    /// An `auto` upstream answered ALPN with h2 at least once.
    speaks_h2: AtomicBool,
    sweeper: AtomicBool,
}

struct Idle {
    tx: H1,
    since: Instant,
}

#[derive(Clone)]
struct H2 {
    tx: http2::SendRequest<OutBody>,
    streams: Arc<Streams>,
}

/// Streams in flight on one HTTP/2 connection, and the server's limit
/// (published by the connection task each time it is polled).
struct Streams {
    active: AtomicUsize,
    max: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Streams {
    fn try_acquire(self: &Arc<Self>) -> Option<StreamGuard> {
        let max = self.max.load(Ordering::Acquire).max(1);
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| StreamGuard(self.clone()))
    }
}

/// One stream's place on an HTTP/2 connection, given back on drop.
struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.0.idle_since) = Instant::now();
        }
    }
}

enum Conn {
    H1 {
        tx: H1,
        reused: bool,
    },
    H2 {
        tx: http2::SendRequest<OutBody>,
        guard: StreamGuard,
        reused: bool,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Pool {
    pub fn new(config: &UpstreamConfig, tls: rustls::ClientConfig) -> Result<Self, rustls::Error> {
        // base_url was validated as an http(s) URI with a host at config load.
        let uri = Uri::try_from(config.base_url.as_str()).expect("validated base_url");
        let https = uri.scheme() == Some(&Scheme::HTTPS);
        let host = uri.host().expect("validated base_url has a host");
        let default_port = if https { 443 } else { 80 };
        let port = uri.port_u16().unwrap_or(default_port);
        let host_header = if port == default_port {
            host.to_owned()
        } else {
            format!("{host}:{port}")
        };
        // `[::1]` in a URI, `::1` for DNS, TCP and SNI.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let tls = if https {
            let mut tls = tls;
            tls.alpn_protocols = match config.http_version {
                HttpVersion::Http1 => vec![b"http/1.1".to_vec()],
                HttpVersion::Auto => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                HttpVersion::Http2 => vec![b"h2".to_vec()],
            };
            let name = ServerName::try_from(host.clone())
                .map_err(|_| rustls::Error::General(format!("{host:?} is not a valid TLS server name")))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(tls)), name))
        } else {
            None
        };
        Ok(Self {
            inner: Arc::new(Inner {
                host_header: HeaderValue::try_from(host_header).expect("a URI's host is a valid header value"),
                host,
                port,
                tls,
                version: config.http_version,
                connect_timeout: config.connect_timeout,
                idle: Mutex::new(Vec::new()),
                h2: Mutex::new(Vec::new()),
                h2_opening: tokio::sync::Mutex::new(()),
                speaks_h2: AtomicBool::new(false),
                sweeper: AtomicBool::new(false),
            }),
        })
    }

    /// Sends `request` (absolute URI) on a pooled or new connection.
    pub async fn send(&self, request: Request<OutBody>) -> Result<Response<Body>, SendError> {
        self.send_or_return(request).await.map_err(|u| u.error)
    }

    /// `send`, handing the request back when none of it was written.
    pub async fn send_or_return(&self, mut request: Request<OutBody>) -> Result<Response<Body>, Unsent> {
        let inner = &self.inner;
        let uri = request.uri().clone();
        let origin_form = Uri::from(
            uri.path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        loop {
            let conn = match inner.checkout() {
                Some(conn) => conn,
                // Boxed: the connect future (DNS, TLS, handshakes) is large,
                // and inline it would be moved with every request's future.
                None => match Box::pin(inner.connect()).await {
                    Ok(conn) => conn,
                    Err(error) => {
                        *request.uri_mut() = uri;
                        return Err(Unsent {
                            error,
                            request: Some(Box::new(request)),
                        });
                    }
                },
            };
            let (result, reused) = match conn {
                Conn::H1 { mut tx, reused } => {
                    *request.uri_mut() = origin_form.clone();
                    request.headers_mut().insert(header::HOST, inner.host_header.clone());
                    if tx.ready().await.is_err() && reused {
                        *request.uri_mut() = uri.clone();
                        continue;
                    }
                    let sent = tx.try_send_request(request).await;
                    let lease = Lease::H1 {
                        pool: inner.clone(),
                        tx,
                    };
                    (sent.map(|r| r.map(|b| Body::new(b, lease))), reused)
                }
                Conn::H2 { mut tx, guard, reused } => {
                    *request.uri_mut() = uri.clone();
                    request.headers_mut().remove(header::HOST);
                    if tx.ready().await.is_err() && reused {
                        continue;
                    }
                    let sent = tx.try_send_request(request).await;
                    (
                        sent.map(|r| r.map(|b| Body::new(b, Lease::H2 { _stream: guard }))),
                        reused,
                    )
                }
            };
            match result {
                Ok(response) => return Ok(response),
                Err(mut e) => match e.take_message() {
                    // Never written: safe to send again, on another connection.
                    Some(unsent) if reused => request = unsent,
                    unsent => {
                        return Err(Unsent {
                            error: SendError::Send(e.into_error()),
                            request: unsent.map(|mut r| {
                                *r.uri_mut() = uri;
                                Box::new(r)
                            }),
                        })
                    }
                },
            }
        }
    }
}

impl Inner {
    fn checkout(&self) -> Option<Conn> {
        if self.version == HttpVersion::Http2 || self.speaks_h2.load(Ordering::Relaxed) {
            if let Some(conn) = self.h2_checkout() {
                return Some(conn);
            }
        }
        if self.version == HttpVersion::Http2 {
            return None;
        }
        let mut idle = lock(&self.idle);
        while let Some(Idle { tx, since }) = idle.pop() {
            if !tx.is_closed() && since.elapsed() < IDLE_TIMEOUT {
                return Some(Conn::H1 { tx, reused: true });
            }
        }
        None
    }

    fn h2_checkout(&self) -> Option<Conn> {
        let conns = lock(&self.h2);
        conns.iter().filter(|c| !c.tx.is_closed()).find_map(|c| {
            let guard = c.streams.try_acquire()?;
            Some(Conn::H2 {
                tx: c.tx.clone(),
                guard,
                reused: true,
            })
        })
    }

    /// An HTTP/1.1 connection whose response was read to the end.
    fn checkin(&self, tx: H1) {
        if tx.is_closed() {
            return;
        }
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE {
            idle.push(Idle {
                tx,
                since: Instant::now(),
            });
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<Conn, SendError> {
        self.start_sweeper();
        let h2_expected = self.version == HttpVersion::Http2 || self.speaks_h2.load(Ordering::Relaxed);
        let _opening = if h2_expected {
            let opening = self.h2_opening.lock().await;
            // Someone else may have opened one while we waited.
            if let Some(conn) = self.h2_checkout() {
                return Ok(conn);
            }
            Some(opening)
        } else {
            None
        };
        let io = tokio::time::timeout(self.connect_timeout, self.dial())
            .await
            .map_err(|_| {
                SendError::Connect(
                    format!("timed out after {}", humantime::format_duration(self.connect_timeout)).into(),
                )
            })?
            .map_err(|e| SendError::Connect(e.into()))?;
        // "2" speaks HTTP/2 whatever ALPN said (a server without it fails
        // the handshake, a clear connect error); "auto" follows ALPN.
        let h2 = match self.version {
            HttpVersion::Http2 => true,
            HttpVersion::Auto => io.alpn_h2(),
            HttpVersion::Http1 => false,
        };
        if h2 {
            self.speaks_h2.store(true, Ordering::Relaxed);
            self.open_h2(io).await
        } else {
            let (tx, connection) = http1::handshake(io).await.map_err(|e| SendError::Connect(e.into()))?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "upstream connection closed with an error");
                }
            });
            Ok(Conn::H1 { tx, reused: false })
        }
    }

    async fn open_h2(&self, io: Io) -> Result<Conn, SendError> {
        let (tx, connection) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_STREAM_WINDOW * H2_MAX_STREAMS as u32)
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(e.into()))?;
        let streams = Arc::new(Streams {
            active: AtomicUsize::new(0),
            max: AtomicUsize::new(max_streams(&connection)),
            idle_since: Mutex::new(Instant::now()),
        });
        tokio::spawn(H2Driver {
            connection: Box::pin(connection),
            streams: streams.clone(),
        });
        let guard = streams.try_acquire().expect("a new connection has room for one stream");
        lock(&self.h2).push(H2 {
            tx: tx.clone(),
            streams,
        });
        Ok(Conn::H2 {
            tx,
            guard,
            reused: false,
        })
    }

    /// TCP (the addresses in order), then TLS for https.
    async fn dial(&self) -> io::Result<Io> {
        let mut last = None;
        for addr in tokio::net::lookup_host((self.host.as_str(), self.port)).await? {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    // Small requests and SSE must not wait for Nagle's algorithm.
                    tcp.set_nodelay(true)?;
                    let Some((tls, name)) = &self.tls else {
                        return Ok(Box::new(TokioIo::new(tcp)));
                    };
                    let stream = tls.connect(name.clone(), tcp).await?;
                    return Ok(Box::new(TokioIo::new(stream)));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host has no address")))
    }

    /// One sweeper per pool, started with its first connection; it ends
    /// when the pool is dropped (a config reload replaces it).
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeper.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(pool) = Weak::upgrade(&pool) else { return };
                pool.sweep();
            }
        });
    }

    fn sweep(&self) {
        lock(&self.idle).retain(|e| !e.tx.is_closed() && e.since.elapsed() < IDLE_TIMEOUT);
        lock(&self.h2).retain(|c| {
            !c.tx.is_closed()
                && (c.streams.active.load(Ordering::Acquire) > 0
                    || lock(&c.streams.idle_since).elapsed() < IDLE_TIMEOUT)
        });
    }

    #[cfg(test)]
    fn idle_connections(&self) -> usize {
        lock(&self.idle).len()
    }
}

/// Drives an HTTP/2 connection and publishes the server's stream limit.
struct H2Driver {
    connection: Pin<Box<H2Connection>>,
    streams: Arc<Streams>,
}

type H2Connection = http2::Connection<Io, OutBody, TokioExecutor>;

/// The streams a connection may carry now: the server's limit, at most ours.
fn max_streams(connection: &H2Connection) -> usize {
    connection.current_max_send_streams().min(H2_MAX_STREAMS)
}

impl Future for H2Driver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let done = self.connection.as_mut().poll(cx);
        let max = max_streams(&self.connection);
        self.streams.max.store(max, Ordering::Release);
        match done {
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "upstream HTTP/2 connection closed with an error");
                Poll::Ready(())
            }
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What a response body gives back when it ends.
enum Lease {
    H1 { pool: Arc<Inner>, tx: H1 },
    H2 { _stream: StreamGuard },
}

/// A response body that returns its connection (HTTP/1.1) or stream slot
/// (HTTP/2) when read to the end.
pub struct Body {
    inner: Incoming,
    lease: Option<Lease>,
}

impl Body {
    fn new(inner: Incoming, lease: Lease) -> Self {
        Self {
            inner,
            lease: Some(lease),
        }
    }
}

impl Drop for Body {
    /// A body read to its last byte but not polled to its end (hyper's
    /// server stops at a known length, the pass-through's case) has still
    /// left its HTTP/1.1 connection idle: give it back. Without this, every
    /// such request opened a new connection.
    fn drop(&mut self) {
        if hyper::body::Body::is_end_stream(&self.inner) {
            if let Some(Lease::H1 { pool, tx }) = self.lease.take() {
                pool.checkin(tx);
            }
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => {
                if let Some(Lease::H1 { pool, tx }) = self.lease.take() {
                    pool.checkin(tx);
                }
            }
            // A broken connection is not given back.
            Poll::Ready(Some(Err(_))) => self.lease = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;
    use crate::config::Config;
    use crate::sim::{Faults, Sim};

    fn upstream(base_url: &str, version: &str) -> UpstreamConfig {
        let toml = format!(
            "[[upstreams]]\nname = \"a\"\nbase_url = \"{base_url}\"\nhttp_version = \"{version}\"\n\
             [[models]]\nname = \"m\"\ntargets = [{{ upstream = \"a\" }}]\n"
        );
        Config::parse(&toml, |_| None).unwrap().upstreams.remove(0)
    }

    fn pool(sim: &Sim, version: &str) -> Pool {
        Pool::new(
            &upstream(&sim.base_url(), version),
            crate::upstream::tls_config().unwrap(),
        )
        .unwrap()
    }

    /// Sends, reads the answer to its end (which returns the connection).
    async fn round_trip(pool: &Pool, request: Request<OutBody>) -> Bytes {
        let response = pool.send(request).await.unwrap();
        response.into_body().collect().await.unwrap().to_bytes()
    }

    fn chat(sim: &Sim, stream: bool) -> Request<OutBody> {
        chat_at(&sim.base_url(), stream)
    }

    fn chat_at(base_url: &str, stream: bool) -> Request<OutBody> {
        let body = format!(r#"{{"model":"m","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#);
        let mut request = Request::new(OutBody::from(Bytes::from(body)));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = format!("{base_url}/chat/completions").parse().unwrap();
        request
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        request
    }

    #[tokio::test]
    async fn http1_connections_go_back_only_when_read_to_the_end() {
        let sim = Sim::start("a", Faults::default()).await.unwrap();
        let pool = pool(&sim, "1.1");
        for _ in 0..5 {
            let response = pool.send(chat(&sim, false)).await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(response.version(), http::Version::HTTP_11);
            response.into_body().collect().await.unwrap();
            // One connection, reused: a new one per request would pile up here.
            assert_eq!(pool.inner.idle_connections(), 1);
        }
        assert_eq!(
            sim.last_request().unwrap().headers[header::HOST],
            sim.addr().to_string()
        );

        // Three at once need three connections; all come back.
        let bodies = futures_util::future::join_all((0..3).map(|_| pool.send(chat(&sim, false)))).await;
        assert_eq!(pool.inner.idle_connections(), 0);
        for response in bodies {
            response.unwrap().into_body().collect().await.unwrap();
        }
        assert_eq!(pool.inner.idle_connections(), 3);

        // A body dropped before its end closes its connection.
        let response = pool.send(chat(&sim, true)).await.unwrap();
        assert_eq!(pool.inner.idle_connections(), 2);
        drop(response);
        assert_eq!(pool.inner.idle_connections(), 2);
        assert_eq!(sim.stats().requests, 9);

        // A body read to its last byte (a known length) but dropped before
        // its end is polled, as hyper's server does, gives its connection back.
        let response = pool.send(chat(&sim, false)).await.unwrap();
        assert_eq!(pool.inner.idle_connections(), 1);
        let mut body = response.into_body();
        while !hyper::body::Body::is_end_stream(&body) {
            body.frame().await.expect("a frame").unwrap();
        }
        drop(body);
        assert_eq!(pool.inner.idle_connections(), 2);
    }

    #[tokio::test]
    async fn idle_connections_close_after_the_idle_timeout() {
        let sim = Sim::start("a", Faults::default()).await.unwrap();
        let pool = pool(&sim, "1.1");
        round_trip(&pool, chat(&sim, false)).await;
        assert_eq!(pool.inner.idle_connections(), 1);
        tokio::time::pause();
        tokio::time::advance(IDLE_TIMEOUT - SWEEP_EVERY).await;
        tokio::task::yield_now().await;
        assert_eq!(pool.inner.idle_connections(), 1, "swept too early");
        tokio::time::advance(2 * SWEEP_EVERY).await;
        tokio::task::yield_now().await;
        assert_eq!(pool.inner.idle_connections(), 0, "not swept");
    }

    #[tokio::test]
    async fn a_closed_idle_connection_is_not_used() {
        let sim = Sim::start("a", Faults::default()).await.unwrap();
        let addr = sim.addr();
        let pool = pool(&sim, "1.1");
        round_trip(&pool, chat(&sim, false)).await;
        assert_eq!(pool.inner.idle_connections(), 1);
        // The upstream restarts on the same port: the pooled connection is dead.
        drop(sim);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !lock(&pool.inner.idle).iter().all(|e| e.tx.is_closed()) {
            assert!(Instant::now() < deadline, "the connection never saw the close");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let sim = Sim::start_on(addr, "a", Faults::default()).await.unwrap();
        let response = pool.send(chat(&sim, false)).await.expect("sent on a new connection");
        assert_eq!(response.status(), 200);
    }

    /// Streams whose readers stopped reading (clients that went quiet) must
    /// not starve the other streams of their HTTP/2 connection. With hyper's
    /// default windows, 2 MiB per stream in a 5 MiB connection window, three
    /// such streams took the whole connection window and every other request
    /// on the connection got its headers and then no data at all.
    #[tokio::test]
    async fn stalled_http2_streams_do_not_starve_their_connection() {
        // About 4 MB per stream, sent as fast as flow control lets it.
        let faults = Faults {
            chunks: 20_000,
            ..Faults::default()
        };
        let sim = Sim::start("a", faults).await.unwrap();
        let pool = pool(&sim, "2");
        let mut stalled = Vec::new();
        for _ in 0..4 {
            stalled.push(pool.send(chat(&sim, true)).await.unwrap());
        }
        assert_eq!(lock(&pool.inner.h2).len(), 1, "one connection carries them all");
        let body = tokio::time::timeout(Duration::from_secs(60), round_trip(&pool, chat(&sim, true)))
            .await
            .expect("a stream starved behind the stalled ones");
        assert!(body.ends_with(b"data: [DONE]\n\n"));
        drop(stalled);
    }

    #[tokio::test]
    async fn http2_opens_another_connection_at_the_stream_limit() {
        // Streams that stay open until released: with one connection and a
        // limit of 2, the third request would wait for one of them to end.
        let faults = Faults {
            stall_after: Some(1),
            ..Faults::default()
        };
        let sim = Sim::start_h2_limited("a", faults, 2).await.unwrap();
        let pool = pool(&sim, "2");
        // One at a time, so each connection's SETTINGS have arrived (before
        // its first response) when the next request picks a connection.
        let mut open = Vec::new();
        for _ in 0..5 {
            let response = tokio::time::timeout(Duration::from_secs(10), pool.send(chat(&sim, true)))
                .await
                .expect("a request waited behind the stream limit")
                .unwrap();
            assert_eq!(response.version(), http::Version::HTTP_2);
            open.push(response);
        }
        assert_eq!(lock(&pool.inner.h2).len(), 3, "5 streams at 2 per connection");
        assert_eq!(sim.stats().streams_opened, 5);
        // Ended streams free their slots: the next request needs no new connection.
        sim.release();
        for response in open {
            response.into_body().collect().await.unwrap();
        }
        round_trip(&pool, chat(&sim, false)).await;
        assert_eq!(lock(&pool.inner.h2).len(), 3);
    }

    /// A TLS upstream on 127.0.0.1 offering h2 and http/1.1 by ALPN, with a
    /// certificate from the test CA in tests/fixtures/tls (100-year validity,
    /// test-only key). Answers every POST with a completion.
    async fn tls_upstream() -> (std::net::SocketAddr, rustls::ClientConfig) {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = CertificateDer::from(include_bytes!("../../tests/fixtures/tls/leaf.der").to_vec());
        let key = PrivateKeyDer::try_from(include_bytes!("../../tests/fixtures/tls/leaf.key.der").to_vec()).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answer = axum::Router::new().route(
            "/v1/chat/completions",
            axum::routing::post(|| async { axum::Json(serde_json::json!({"usage": {"prompt_tokens": 1}})) }),
        );
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let (acceptor, answer) = (acceptor.clone(), answer.clone());
                tokio::spawn(async move {
                    // A client that rejects the certificate aborts the handshake.
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper_util::service::TowerToHyperService::new(answer);
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(
                include_bytes!("../../tests/fixtures/tls/ca.der").to_vec(),
            ))
            .unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (addr, client)
    }

    #[tokio::test]
    async fn tls_upstreams_speak_the_configured_version() {
        let (addr, tls) = tls_upstream().await;
        for (version, expected) in [
            ("1.1", http::Version::HTTP_11),
            ("auto", http::Version::HTTP_2),
            ("2", http::Version::HTTP_2),
        ] {
            let base_url = format!("https://{addr}/v1");
            let pool = Pool::new(&upstream(&base_url, version), tls.clone()).unwrap();
            for _ in 0..2 {
                let response = pool.send(chat_at(&base_url, false)).await.unwrap();
                assert_eq!(response.version(), expected, "http_version = {version}");
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(&body[..], br#"{"usage":{"prompt_tokens":1}}"#);
            }
            let connections = pool.inner.idle_connections() + lock(&pool.inner.h2).len();
            assert_eq!(connections, 1, "http_version = {version}: one connection, reused");
        }
        // The certificate is checked: the public roots do not know the test CA.
        let base_url = format!("https://{addr}/v1");
        let pool = Pool::new(&upstream(&base_url, "1.1"), crate::upstream::tls_config().unwrap()).unwrap();
        let Err(error) = pool.send(chat_at(&base_url, false)).await else {
            panic!("an untrusted certificate was accepted");
        };
        assert!(error.is_connect(), "{error:?}");
    }

    #[tokio::test]
    async fn connect_errors_are_told_apart() {
        let sim = Sim::start("a", Faults::default()).await.unwrap();
        let pool = pool(&sim, "1.1");
        drop(sim);
        let sim_gone = Sim::start("b", Faults::default()).await.unwrap();
        // The request names the live sim, but the pool dials the dead one.
        let Err(error) = pool.send(chat(&sim_gone, false)).await else {
            panic!("the request reached a stopped upstream");
        };
        assert!(error.is_connect(), "{error:?}");
    }
}
