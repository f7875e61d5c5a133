//! Client connections: how many are held, for how long, and which one gives way when the cap is
//! reached.
//!
//! Every connection gets `header_timeout` to send a request's header block, counted from the
//! connection's start or from the end of the previous response, so a half-sent header and an
//! idle keep-alive connection are both closed once it passes (hyper's own header timer). At most
//! `max_connections` are open at once; when a new client arrives at the cap, the connection that
//! has been idle longest (no request in the handler) is closed to make room, so an attacker's
//! idle sockets never lock out `/healthz` or a real client. Only when every open connection is
//! busy with a request is the new one closed at once.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::metrics::ConnectionMetrics;

/// File descriptors kept back from client connections: the journal, the outbox and the state
/// store (with their WAL and index files), outbound connections to vendors and the CLI's short
/// connections need them. A quarter of the limit, at least 256.
pub const FD_RESERVE_MIN: u64 = 256;
/// How long a connection told to close (evicted at the cap) may take to finish the response it is
/// writing before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long, at shutdown, a connection may take to finish the request it is serving: a body may
/// take [`BODY_TIMEOUT`], and the journal answers within it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long a client may take to send a request's whole body, on every route: a slow or stalled
/// body would otherwise keep its connection busy (busy connections are never evicted).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Pause after `accept` fails (out of file descriptors, most often), so a full table does not
/// turn the accept loop into a busy loop.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Raises the soft limit on open files to the hard limit (Linux defaults the soft limit to 1024
/// and many services' to 512), and returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(current), hard) = (limit.current, limit.maximum) else {
        return u64::MAX; // unlimited
    };
    let target = hard.unwrap_or(current);
    if target > current {
        let raised = rustix::process::Rlimit {
            current: Some(target),
            maximum: hard,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return target;
        }
    }
    current
}

/// The connection cap that fits `fd_limit`: the limit less [`FD_RESERVE_MIN`] or a quarter of it,
/// whichever is more, and at least 16.
pub fn default_max_connections(fd_limit: u64) -> usize {
    let reserve = (fd_limit / 4).max(FD_RESERVE_MIN);
    fd_limit.saturating_sub(reserve).clamp(16, 1_000_000) as usize
}

/// How connections are served.
#[derive(Clone, Debug)]
pub struct ConnectionSettings {
    pub max_connections: usize,
    pub header_timeout: Duration,
    /// Whole requests (body arrived) in handlers at once, all connections together; past it a
    /// request is answered 503 `server.busy` with `Retry-After: 1` at once.
    pub max_in_flight: usize,
}

/// Routes served past the in-flight cap: probes must tell "overloaded" from "down".
const NEVER_SHED: [&str; 2] = ["/healthz", "/readyz"];

/// The answer to a request past the in-flight cap.
fn busy_response() -> axum::response::Response {
    axum::response::IntoResponse::into_response(crate::error::ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "server.busy",
        "the gateway is handling as many requests as it is configured to; retry in a second",
    ))
}

/// One open connection, as the registry sees it.
struct Entry {
    /// Requests of this connection now in a handler.
    busy: Arc<AtomicUsize>,
    /// When its last request left the handler (ms since the registry started).
    idle_since: Arc<AtomicU64>,
    close: Arc<Notify>,
}

/// The open connections.
struct Registry {
    started: Instant,
    /// Set when the server stops: connections then get [`SHUTDOWN_GRACE`], not [`CLOSE_GRACE`].
    stopping: std::sync::atomic::AtomicBool,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Makes room for one more connection if the cap is reached: closes the connection idle
    /// longest.
    fn make_room(&self, max: usize) -> Room {
        let mut open = self.lock();
        if open.len() < max {
            return Room::Free;
        }
        let idlest = open
            .iter()
            .filter(|(_, e)| e.busy.load(Ordering::Acquire) == 0)
            .min_by_key(|(_, e)| e.idle_since.load(Ordering::Relaxed))
            .map(|(id, _)| *id);
        match idlest.and_then(|id| open.remove(&id)) {
            Some(e) => {
                e.close.notify_one();
                Room::Evicted
            }
            None => Room::Full,
        }
    }
}

enum Room {
    /// Below the cap.
    Free,
    /// At the cap: the connection idle longest was told to close.
    Evicted,
    /// At the cap, and every open connection is busy with a request.
    Full,
}

/// Decrements a connection's busy count when its request leaves the handler.
struct Busy {
    busy: Arc<AtomicUsize>,
    idle_since: Arc<AtomicU64>,
    registry: Arc<Registry>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.idle_since
            .store(self.registry.now_ms(), Ordering::Relaxed);
        self.busy.fetch_sub(1, Ordering::Release);
    }
}

/// Accepts and serves connections on `listener` until `shutdown` completes, then stops
/// accepting, lets every connection finish its request in flight, and returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<axum_server::tls_rustls::RustlsConfig>,
    settings: ConnectionSettings,
    metrics: ConnectionMetrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let registry = Arc::new(Registry {
        started: Instant::now(),
        stopping: std::sync::atomic::AtomicBool::new(false),
        next_id: AtomicU64::new(0),
        open: Mutex::new(HashMap::new()),
    });
    let in_flight = Arc::new(tokio::sync::Semaphore::new(settings.max_in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        // Reap finished connection tasks as we go, so the set does not grow.
        while tasks.try_join_next().is_some() {}
        let (stream, _peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a connection");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        match registry.make_room(settings.max_connections) {
            Room::Free => {}
            Room::Evicted => {
                metrics.evicted.inc();
            }
            Room::Full => {
                metrics.refused.inc();
                drop(stream);
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let id = registry.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Entry {
            busy: Arc::new(AtomicUsize::new(0)),
            idle_since: Arc::new(AtomicU64::new(registry.now_ms())),
            close: Arc::new(Notify::new()),
        };
        let (busy, idle_since, close) = (
            entry.busy.clone(),
            entry.idle_since.clone(),
            entry.close.clone(),
        );
        registry.lock().insert(id, entry);
        metrics.open.inc();
        let registry = registry.clone();
        let app = app.clone();
        let tls = tls.clone();
        let header_timeout = settings.header_timeout;
        let metrics = metrics.clone();
        let busy_here = busy.clone();
        let in_flight = in_flight.clone();
        tasks.spawn(async move {
            let service = {
                let registry = registry.clone();
                let shed = metrics.shed.clone();
                hyper::service::service_fn(move |req: Request<Incoming>| {
                    busy.fetch_add(1, Ordering::Acquire);
                    let guard = Busy {
                        busy: busy.clone(),
                        idle_since: idle_since.clone(),
                        registry: registry.clone(),
                    };
                    let app = app.clone();
                    let never_shed = NEVER_SHED.contains(&req.uri().path());
                    let (in_flight, shed) = (in_flight.clone(), shed.clone());
                    async move {
                        // A request takes a place only once its whole body is here: one still
                        // sending it costs a connection (capped, and timed out), not a place,
                        // so slow senders cannot hold every place.
                        let (parts, body) = req.into_parts();
                        let limit = prefetch_limit(parts.uri.path());
                        let body =
                            Prefetched::read(TimedBody::new(body, BODY_TIMEOUT), limit).await;
                        // Held until the response is written, like the busy mark. A body that
                        // failed or is too large takes a place too (its route answers at once).
                        let permit = if never_shed {
                            None
                        } else {
                            match in_flight.try_acquire_owned() {
                                Ok(p) => Some(p),
                                Err(_) => {
                                    shed.inc();
                                    drop(guard);
                                    return Ok(busy_response());
                                }
                            }
                        };
                        let guard = (guard, permit);
                        let req = Request::from_parts(parts, axum::body::Body::new(body));
                        let response = tower::ServiceExt::oneshot(app, req).await;
                        // Busy until the response is written, not only until the handler ends.
                        response.map(|r| {
                            r.map(|b| {
                                axum::body::Body::new(http_body_util::BodyExt::map_frame(
                                    b,
                                    move |frame| {
                                        let _busy = &guard;
                                        frame
                                    },
                                ))
                            })
                        })
                    }
                })
            };
            match tls {
                None => {
                    serve_one(
                        TokioIo::new(stream),
                        service,
                        header_timeout,
                        &close,
                        &busy_here,
                        &registry.stopping,
                    )
                    .await
                }
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.get_inner());
                    // The handshake counts against the header timeout too.
                    match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_one(
                                TokioIo::new(stream),
                                service,
                                header_timeout,
                                &close,
                                &busy_here,
                                &registry.stopping,
                            )
                            .await
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            registry.lock().remove(&id);
            metrics.open.dec();
        });
    }
    // Shutting down: no new connections; each open one finishes its request and closes.
    drop(listener);
    registry.stopping.store(true, Ordering::SeqCst);
    for e in registry.lock().values() {
        e.close.notify_one();
    }
    while tasks.join_next().await.is_some() {}
}

/// Most of a body read before the request takes a place in flight: just past the route's own
/// limit (500 KB for a batch, 32 KB for one message; the admin, OAuth and DSR routes take less),
/// so what is larger is refused by its route, with its code. What connections buffer is bounded
/// by this, as it was by the routes' limits before.
fn prefetch_limit(path: &str) -> usize {
    if path == "/v1/batch" || path == "/v1/import" {
        handoff_core::ingest::MAX_BATCH_BYTES + 1
    } else {
        64 * 1024
    }
}

/// A request body read ahead (up to [`prefetch_limit`], or until it failed), then handed to
/// the route as if it were still arriving: the bytes read, then the rest or the error.
struct Prefetched {
    first: Option<bytes::Bytes>,
    error: Option<Box<dyn std::error::Error + Send + Sync>>,
    rest: Option<TimedBody>,
}

impl Prefetched {
    async fn read(mut body: TimedBody, limit: usize) -> Self {
        let announced = hyper::body::Body::size_hint(&body).lower() as usize;
        if announced > limit {
            // The route refuses it from its Content-Length: nothing to read ahead.
            return Prefetched {
                first: None,
                error: None,
                rest: Some(body),
            };
        }
        let mut buf = bytes::BytesMut::with_capacity(announced);
        loop {
            match http_body_util::BodyExt::frame(&mut body).await {
                None => {
                    return Prefetched {
                        first: Some(buf.freeze()),
                        error: None,
                        rest: None,
                    };
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                    if buf.len() > limit {
                        return Prefetched {
                            first: Some(buf.freeze()),
                            error: None,
                            rest: Some(body),
                        };
                    }
                }
                Some(Err(e)) => {
                    return Prefetched {
                        first: Some(buf.freeze()),
                        error: Some(e),
                        rest: None,
                    };
                }
            }
        }
    }
}

impl hyper::body::Body for Prefetched {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(first) = this.first.take().filter(|b| !b.is_empty()) {
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(first))));
        }
        if let Some(e) = this.error.take() {
            return Poll::Ready(Some(Err(e)));
        }
        match this.rest.as_mut() {
            Some(rest) => std::pin::Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.as_ref().is_none_or(|b| b.is_empty())
            && self.error.is_none()
            && self.rest.as_ref().is_none_or(|r| r.is_end_stream())
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match (&self.first, &self.rest, &self.error) {
            (Some(first), None, None) => hyper::body::SizeHint::with_exact(first.len() as u64),
            _ => hyper::body::SizeHint::default(),
        }
    }
}

/// A request body that must arrive whole within a deadline; past it, reading fails (the
/// route answers 408 with `request.body.timeout`).
struct TimedBody {
    inner: Incoming,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl TimedBody {
    fn new(inner: Incoming, within: Duration) -> Self {
        Self {
            inner,
            deadline: Box::pin(tokio::time::sleep(within)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the request body timed out: it did not arrive within {} s", BODY_TIMEOUT.as_secs())]
struct BodyTimedOut;

/// `true` when reading a body failed because of [`BODY_TIMEOUT`] (anywhere in its chain).
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if c.is::<BodyTimedOut>() {
            return true;
        }
        cause = c.source();
    }
    false
}

impl hyper::body::Body for TimedBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

async fn serve_one<I, S>(
    io: I,
    service: S,
    header_timeout: Duration,
    close: &Notify,
    busy: &AtomicUsize,
    stopping: &std::sync::atomic::AtomicBool,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = axum::body::Body> + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        () = close.notified() => {
            // Idle (no request in a handler or being written): dropped at once, which frees its
            // descriptor now. Otherwise it finishes what it is writing, within a bound.
            if busy.load(Ordering::Acquire) > 0 {
                conn.as_mut().graceful_shutdown();
                let grace = if stopping.load(Ordering::SeqCst) {
                    SHUTDOWN_GRACE
                } else {
                    CLOSE_GRACE
                };
                let _ = tokio::time::timeout(grace, conn).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_descriptors_for_the_stores() {
        assert_eq!(default_max_connections(512), 256);
        assert_eq!(default_max_connections(1024), 768);
        assert_eq!(default_max_connections(65_536), 49_152);
        assert_eq!(default_max_connections(100), 16);
    }
}
