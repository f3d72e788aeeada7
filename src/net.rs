//! Serving TCP connections until shutdown, then closing them gracefully (a
//! response in progress finishes): the accept loop the gateway
//! (`edge::server`) and the simulator (`sim`) share, and `Stall`, the timer
//! behind the gateway's client timeouts.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// Accepts connections until `shutdown` completes and hands each to
/// `serve_connection`, which spawns its connection under `graceful`. Then
/// stops accepting and returns once every connection has closed.
pub async fn accept(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    mut serve_connection: impl FnMut(TokioIo<TcpStream>, &GracefulShutdown),
) {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    // Small SSE events must not wait for Nagle's algorithm.
                    let _ = tcp.set_nodelay(true);
                    serve_connection(TokioIo::new(tcp), &graceful);
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

/// A timer that runs only while something waits on a client: the first
/// `Pending` starts it, any progress drops it. So a connection or body that
/// is not stalled holds 8 bytes and never touches tokio's timer wheel (a
/// timer armed on every request cost about 1,400 instructions, 2 %).
pub struct Stall {
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
}

impl Stall {
    pub fn new(limit: Duration) -> Self {
        Self { limit, timer: None }
    }

    /// Watches one poll of what may stall: once it is ready the wait has
    /// ended and its value comes back (`Some`); while it is pending, `None`
    /// once `limit` has passed since the wait began.
    pub fn watch<T>(&mut self, cx: &mut Context<'_>, poll: Poll<T>) -> Poll<Option<T>> {
        if let Poll::Ready(value) = poll {
            self.timer = None;
            return Poll::Ready(Some(value));
        }
        let limit = self.limit;
        ready!(self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)))
            .as_mut()
            .poll(cx));
        Poll::Ready(None)
    }
}
