//! Keep-alive HTTP/1.1 connections to instances and the exchange of one
//! request over one: each instance keeps a stack of idle connections, a
//! request takes the most recently used one (or connects), writes its head
//! and body, and reads the response head; its response body
//! ([`PooledBody`]) reads the rest and puts the connection back when it
//! has read the body to its end.
//!
//! All of it runs in the client connection's task: no task a connection,
//! no channel between the two; only the rest of a request body whose
//! answer came first is sent by a task of its own. The wire format is
//! `h1`'s.
//!
//! A connection goes back only when its response body was read whole, its
//! request body sent whole, the instance did not ask to close, and nothing
//! followed the body; one dropped early (the client went away) is closed. An idle connection has
//! no task watching it: one that the instance closed, or that has bytes
//! nobody asked for, is found out when taken (a look at its readiness,
//! without a syscall unless the socket is readable) and by the sweep.
//! Connections idle longer than `backend_pool_idle_timeout` are closed by
//! [`Idle::sweep`], which the accept loops run.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io::{self, IoSlice};
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::net::TcpStream;

use crate::balance::InstanceState;
use crate::body::BoxError;
use crate::h1::{Decoded, Decoder, H1Error, ResponseHead};

/// The first read of a connection reserves this much; reads that fill
/// their room double it, up to `PoolConfig::max_buf`.
const FIRST_READ: usize = 8 * 1024;

/// Why a request got no response from an instance.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// No connection could be made (refused, unreachable, timed out): the
    /// request never left the proxy.
    #[error("connecting: {0}")]
    Connect(io::Error),
    /// The connection could not take the request's head: the instance
    /// cannot have acted on it.
    #[error("the connection closed before the request was sent: {0}")]
    Unsent(io::Error),
    /// The connection ended after the request was sent, before any byte
    /// of an answer.
    #[error("the connection closed before any answer: {0}")]
    Unanswered(io::Error),
    /// The connection broke in the middle of the response head.
    #[error("the connection broke: {0}")]
    Broken(io::Error),
    #[error(transparent)]
    Response(#[from] H1Error),
    /// No response head within `backend_response_timeout` of the request's
    /// end (or the head could not be written in that time).
    #[error("no answer in time")]
    Timeout,
    /// The client's request body failed (the client went away, or sent a
    /// body that does not match its framing): no fault of the instance.
    #[error("the request body: {0}")]
    ClientBody(BoxError),
}

impl SendError {
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

/// A connection to an instance and what has been read from it. The
/// socket is shared with a request body still being sent while the
/// response comes ([`Writer`]).
#[derive(Debug)]
pub(crate) struct Upstream {
    stream: Arc<TcpStream>,
    buf: BytesMut,
    read_size: usize,
    max_read: usize,
    /// Made on a current-thread runtime (the proxy's shards), where
    /// [`forget_readable`] is safe.
    forgets: bool,
}

impl Upstream {
    fn new(stream: TcpStream, max_read: usize) -> Upstream {
        let forgets = tokio::runtime::Handle::try_current().is_ok_and(|handle| {
            handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
        });
        Upstream {
            stream: Arc::new(stream),
            buf: BytesMut::new(),
            read_size: FIRST_READ.min(max_read),
            max_read,
            forgets,
        }
    }

    /// The socket and what was read beyond the response head (an upgraded
    /// connection's first bytes); `None` while a request body is still
    /// being sent on it.
    pub fn into_parts(self) -> Option<(TcpStream, BytesMut)> {
        Arc::try_unwrap(self.stream)
            .ok()
            .map(|stream| (stream, self.buf))
    }

    /// Whether a connection that sat idle can take a request: nothing came
    /// on it while idle (neither the instance's close nor stray bytes), as
    /// far as the runtime has seen. `try_read` reads only when the socket
    /// was seen readable (no syscall otherwise) and, unlike
    /// `poll_read_ready`, never answers "not ready" because the task has
    /// used up its scheduling budget.
    fn is_open(&self) -> bool {
        matches!(
            self.stream.try_read(&mut [0u8; 1]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock
        )
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        poll_fill(
            &self.stream,
            &mut self.buf,
            (&mut self.read_size, self.max_read, self.forgets),
            cx,
        )
    }
}

/// Reads what the socket has into `buf`; `Ok(0)` at its end. `sizing`:
/// the read size (grown while reads fill it), its cap, and whether a short
/// read may clear the readiness ([`forget_readable`]).
fn poll_fill(
    stream: &TcpStream,
    buf: &mut BytesMut,
    (read_size, max_read, forgets): (&mut usize, usize, bool),
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < *read_size / 2 {
        buf.reserve(*read_size);
    }
    loop {
        ready!(stream.poll_read_ready(cx))?;
        let room = buf.capacity() - buf.len();
        match stream.try_read_buf(buf) {
            Ok(n) => {
                if n == room && *read_size < max_read {
                    *read_size = (*read_size * 2).min(max_read);
                } else if forgets && n > 0 && n < room {
                    forget_readable(stream);
                }
                return Poll::Ready(Ok(n));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Clears the socket's read readiness after a read that returned less
/// than it had room for, which the kernel does only when the socket's
/// receive queue is empty. Whatever arrives later raises a readiness event
/// of its own (a newer one than this clears; a close is never cleared).
/// Without this, the readiness stays set until a read finds `EAGAIN`: one
/// `recvfrom` a request more, in [`Upstream::is_open`] or the next read.
/// Called in the same poll as the read, and only on a current-thread
/// runtime, where no readiness event can be taken in between (on a
/// multi-thread one another worker's driver could record new data there,
/// and this would clear it).
fn forget_readable(stream: &TcpStream) {
    let _ = stream.try_io(tokio::io::Interest::READABLE, || {
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
}

/// Writes all of `bufs`; an error if the socket takes nothing for
/// `stall` (the instance stopped reading).
async fn write_all(
    stream: &TcpStream,
    mut bufs: &mut [IoSlice<'_>],
    stall: Duration,
) -> io::Result<()> {
    while !bufs.is_empty() {
        match stream.try_write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::timeout(stall, stream.writable())
                    .await
                    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// An instance's idle connections, the most recently used last.
#[derive(Debug, Default)]
pub(crate) struct Idle {
    conns: Mutex<VecDeque<IdleConn>>,
}

#[derive(Debug)]
struct IdleConn {
    upstream: Upstream,
    since: Instant,
}

impl Idle {
    /// The most recently used connection that is still open and fresh.
    fn take(&self, max_age: Duration) -> Option<Upstream> {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(conn) = conns.pop_back() {
            if conn.since.elapsed() < max_age && conn.upstream.is_open() {
                return Some(conn.upstream);
            }
        }
        None
    }

    /// Keeps `upstream` for another request, unless `max` are kept already.
    fn put(&self, upstream: Upstream, max: usize) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if conns.len() < max {
            conns.push_back(IdleConn {
                upstream,
                since: Instant::now(),
            });
        }
    }

    /// Closes connections idle for `max_age` or more, and those the
    /// instance has closed.
    pub fn sweep(&self, max_age: Duration) {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if !conns.is_empty() {
            conns.retain(|c| c.since.elapsed() < max_age && c.upstream.is_open());
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// How connections to instances are made, used and kept.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PoolConfig {
    pub connect_timeout: Duration,
    /// From the request's end to the response head.
    pub response_timeout: Duration,
    pub idle_timeout: Duration,
    /// The longest a request body may send nothing (`Stalled` after).
    pub body_stall: Duration,
    pub max_idle: usize,
    /// The largest read (and so the largest response head).
    pub max_buf: usize,
}

/// A request for an instance.
pub(crate) struct Outgoing<'a, B: 'static> {
    /// Its head, framing headers included (`h1::RequestHead`).
    pub head: &'a [u8],
    /// A HEAD request: the response has no body.
    pub head_request: bool,
    /// Its body, if it has one, sent chunked or as is (the head says
    /// which).
    pub body: Option<B>,
    pub chunked: bool,
}

/// An instance's answer: the response head, the connection its body
/// comes on, and the rest of the request body when the instance answered
/// before it had all of it.
pub(crate) struct Exchange {
    pub head: ResponseHead,
    pub upstream: Upstream,
    pub writer: Option<Writer>,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("head", &self.head)
            .field("upstream", &self.upstream)
            .field("writing", &self.writer.is_some())
            .finish()
    }
}

/// What is left of sending a request body.
pub(crate) type Writer = Pin<Box<dyn Future<Output = Result<(), BodyError>> + Send>>;

impl Exchange {
    /// The response, its body read from the connection as it is polled.
    pub fn into_response(
        self,
        instance: Arc<InstanceState>,
        max_idle: usize,
    ) -> http::Response<PooledBody> {
        let ResponseHead {
            response,
            decoder,
            keep_alive,
        } = self.head;
        // The rest of the request body goes on a task of its own, not as
        // the client takes the response: a client that sends its whole
        // upload before it reads (and an instance that answers while it
        // reads) would otherwise wait on each other.
        let writer = self.writer.map(tokio::spawn);
        response.map(|()| PooledBody {
            upstream: Some(self.upstream),
            writer,
            decoder,
            keep_alive,
            instance,
            max_idle,
        })
    }
}

/// Sends `request` to `instance` over an idle connection or a new one. A
/// request that a pooled connection could not take (it closed before the
/// head was written) goes once more, on a new connection: a connection
/// kept idle may have been closed by the instance a moment before it was
/// taken. A request sent that got no answer is not sent here again: the
/// instance may have acted on it, or be going away (its address may
/// already lead nowhere, and a connect there would wait out the connect
/// timeout); `forward` sends a replayable one to another instance.
pub(crate) async fn send<B>(
    config: &PoolConfig,
    instance: &InstanceState,
    request: Outgoing<'_, B>,
) -> Result<Exchange, SendError>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    let mut body = request.body;
    let mut pooled = true;
    loop {
        let taken = if pooled {
            instance.conns.take(config.idle_timeout)
        } else {
            None
        };
        let (mut upstream, reused) = match taken {
            Some(upstream) => (upstream, true),
            None => (connect(config, instance).await?, false),
        };
        let exchanged = exchange(
            &mut upstream,
            request.head,
            &mut body,
            request.chunked,
            request.head_request,
            config.response_timeout,
            config.body_stall,
        )
        .await;
        match exchanged {
            Ok((head, writer)) => {
                return Ok(Exchange {
                    head,
                    upstream,
                    writer,
                });
            }
            Err(SendError::Unsent(_)) if reused => pooled = false,
            Err(e) => return Err(e),
        }
    }
}

async fn connect(config: &PoolConfig, instance: &InstanceState) -> Result<Upstream, SendError> {
    let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(instance.addr))
        .await
        .map_err(|_| SendError::Connect(io::ErrorKind::TimedOut.into()))?
        .map_err(SendError::Connect)?;
    let _ = stream.set_nodelay(true);
    Ok(Upstream::new(stream, config.max_buf))
}

/// Why sending a request body stopped.
pub(crate) enum BodyError {
    Client(BoxError),
    Instance(io::Error),
}

/// One request and its response head over `upstream`. The body is taken
/// out of `body` only once the head is written, and is sent while the
/// response is read: an instance may answer before it has read all of the
/// body (a 413, or a response streamed while the request streams), and
/// then what is left of sending it comes back with the head.
async fn exchange<B>(
    upstream: &mut Upstream,
    head: &[u8],
    body: &mut Option<B>,
    chunked: bool,
    head_request: bool,
    timeout: Duration,
    body_stall: Duration,
) -> Result<(ResponseHead, Option<Writer>), SendError>
where
    B: HttpBody<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError> + Send,
{
    let Upstream {
        stream,
        buf,
        read_size,
        max_read,
        forgets,
    } = upstream;
    let sizing = (read_size, *max_read, *forgets);
    if body.is_none() {
        // One timer for the whole exchange.
        let head = tokio::time::timeout(timeout, async {
            write_all(stream, &mut [IoSlice::new(head)], timeout)
                .await
                .map_err(SendError::Unsent)?;
            read_head(stream, buf, sizing, head_request).await
        })
        .await
        .map_err(|_| SendError::Timeout)??;
        return Ok((head, None));
    }
    write_all(stream, &mut [IoSlice::new(head)], timeout)
        .await
        .map_err(SendError::Unsent)?;
    let Some(body) = body.take() else {
        return Err(SendError::Unsent(io::ErrorKind::InvalidInput.into()));
    };
    let mut writing: Writer = Box::pin(write_body(
        stream.clone(),
        body,
        chunked,
        (timeout, body_stall),
    ));
    let mut reading = pin!(read_head(stream, buf, sizing, head_request));
    // The response timeout counts once the body is sent, so that a slow
    // upload is not taken for a slow instance.
    let mut deadline = pin!(tokio::time::sleep(timeout));
    let mut sent = false;
    let mut write_failed = None;
    loop {
        tokio::select! {
            biased;
            head = &mut reading => {
                return match (head, write_failed) {
                    (Ok(mut head), write_failed) => {
                        if write_failed.is_some() {
                            // The instance stopped reading the body: the
                            // connection cannot take another request.
                            head.keep_alive = false;
                        }
                        Ok((head, (!sent).then_some(writing)))
                    }
                    (Err(_), Some(e)) => Err(SendError::Broken(e)),
                    (Err(e), None) => Err(e),
                };
            }
            written = &mut writing, if !sent => {
                sent = true;
                deadline.as_mut().reset(tokio::time::Instant::now() + timeout);
                match written {
                    Ok(()) => {}
                    Err(BodyError::Client(e)) => return Err(SendError::ClientBody(e)),
                    Err(BodyError::Instance(e)) => write_failed = Some(e),
                }
            }
            () = &mut deadline, if sent => return Err(SendError::Timeout),
        }
    }
}

/// A client's request body sent nothing for this long: cut off (408), so
/// that a stalled upload does not hold a connection to an instance for
/// ever.
#[derive(Debug, thiserror::Error)]
#[error("the request body sent nothing for {0:?}")]
pub(crate) struct Stalled(pub Duration);

/// Sends a request body, chunked or as is; trailers are dropped. `stall`:
/// the longest a write to the instance, and a wait for the client's next
/// bytes, may take.
async fn write_body<B>(
    stream: Arc<TcpStream>,
    mut body: B,
    chunked: bool,
    (stall, client_stall): (Duration, Duration),
) -> Result<(), BodyError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError> + Send,
{
    loop {
        let frame = match tokio::time::timeout(client_stall, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => return Err(BodyError::Client(Box::new(Stalled(client_stall)))),
        };
        let frame = frame.map_err(|e| BodyError::Client(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        let written = if chunked {
            let size = format!("{:x}\r\n", data.len());
            write_all(
                &stream,
                &mut [
                    IoSlice::new(size.as_bytes()),
                    IoSlice::new(&data),
                    IoSlice::new(b"\r\n"),
                ],
                stall,
            )
            .await
        } else {
            write_all(&stream, &mut [IoSlice::new(&data)], stall).await
        };
        written.map_err(BodyError::Instance)?;
    }
    if chunked {
        write_all(&stream, &mut [IoSlice::new(b"0\r\n\r\n")], stall)
            .await
            .map_err(BodyError::Instance)?;
    }
    Ok(())
}

/// Reads until a final response head (1xx other than 101 skipped).
async fn read_head(
    stream: &TcpStream,
    buf: &mut BytesMut,
    (read_size, max_read, forgets): (&mut usize, usize, bool),
    head_request: bool,
) -> Result<ResponseHead, SendError> {
    let mut answered = false;
    loop {
        if !buf.is_empty() {
            answered = true;
            if let Some(head) = crate::h1::parse_response(buf, head_request)? {
                let status = head.response.status();
                if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
                    continue;
                }
                return Ok(head);
            }
            if buf.len() >= max_read {
                return Err(H1Error::HeadTooLarge(max_read).into());
            }
        }
        let failed = |e| {
            if answered {
                SendError::Broken(e)
            } else {
                SendError::Unanswered(e)
            }
        };
        match poll_fn(|cx| poll_fill(stream, buf, (&mut *read_size, max_read, forgets), cx)).await {
            Ok(0) => return Err(failed(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => {}
            Err(e) => return Err(failed(e)),
        }
    }
}

/// An instance's response body, read from its connection as the client
/// takes it, while what is left of the request body is sent; the
/// connection goes back to the instance's pool once both have ended
/// (dropped early, it closes).
pub(crate) struct PooledBody {
    upstream: Option<Upstream>,
    /// The task sending the rest of the request body, if the response
    /// came before it was all sent.
    writer: Option<tokio::task::JoinHandle<Result<(), BodyError>>>,
    decoder: Decoder,
    keep_alive: bool,
    instance: Arc<InstanceState>,
    max_idle: usize,
}

impl PooledBody {
    fn release(&mut self) {
        let upstream = self.upstream.take();
        if self.writer.take().is_some() {
            // The response ended before the request body was sent: its
            // task sends the rest (the instance may want it whole), and
            // the connection closes after it.
            return;
        }
        if let Some(upstream) = upstream
            && self.keep_alive
            && upstream.buf.is_empty()
        {
            self.instance.conns.put(upstream, self.max_idle);
        }
    }

    fn fail(&mut self, e: impl Into<BoxError>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.upstream = None;
        if let Some(writer) = self.writer.take() {
            writer.abort();
        }
        Poll::Ready(Some(Err(e.into())))
    }
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(writer) = this.writer.as_mut()
            && let Poll::Ready(written) = Pin::new(writer).poll(cx)
        {
            this.writer = None;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(BodyError::Client(e))) => return this.fail(e),
                Ok(Err(BodyError::Instance(_))) => this.keep_alive = false,
                Err(e) => return this.fail(e),
            }
        }
        loop {
            let Some(upstream) = this.upstream.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut upstream.buf) {
                Ok(Decoded::Data(data)) => {
                    if this.decoder.is_done() {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Decoded::End) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Decoded::Trailers(trailers)) => {
                    this.release();
                    return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                }
                Ok(Decoded::More) => {}
                Err(e) => return this.fail(e),
            }
            match ready!(upstream.poll_fill(cx)) {
                Ok(0) => match this.decoder.at_eof() {
                    Ok(_) => {
                        this.upstream = None;
                        return Poll::Ready(None);
                    }
                    Err(e) => return this.fail(e),
                },
                Ok(_) => {}
                Err(e) => return this.fail(e),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder
            .exact()
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // A body with nothing to read (HEAD, 204, 304, length 0) is never
        // polled; it is whole all the same.
        if self.decoder.is_done() {
            self.release();
        } else if let Some(writer) = self.writer.take() {
            // The client went away before the response's end: the upload
            // it was sending stops too.
            writer.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{Empty, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    /// A test instance: listens on a free port and runs `serve` on each
    /// connection it takes, on a task of its own; the connections taken
    /// are counted (the count is `serve`'s second argument before it).
    async fn serve_each<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
    where
        F: Fn(TcpStream, usize) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(serve(stream, count.fetch_add(1, Ordering::SeqCst)));
            }
        });
        (addr, accepted)
    }

    /// Reads until a request head is whole: all that came, the head and
    /// whatever followed it; `None` if the connection ended first.
    async fn read_head_bytes(stream: &mut TcpStream) -> Option<Vec<u8>> {
        let mut have = Vec::new();
        let mut buf = [0u8; 4096];
        while !have.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            have.extend_from_slice(&buf[..n]);
        }
        Some(have)
    }

    /// A backend that answers every request head on a connection with
    /// `response` (whole, as written), counting connections. It reads no
    /// request bodies.
    async fn backend(response: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
        serve_each(move |mut stream, _| async move {
            let mut buf = vec![0u8; 4096];
            let mut have = Vec::new();
            loop {
                let n = stream.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return;
                }
                have.extend_from_slice(&buf[..n]);
                while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                    have.drain(..end + 4);
                    stream.write_all(response.as_bytes()).await.unwrap();
                }
            }
        })
        .await
    }

    fn config() -> PoolConfig {
        PoolConfig {
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(5),
            body_stall: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_idle: 4,
            max_buf: 64 * 1024,
        }
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";

    fn get() -> Outgoing<'static, Empty<Bytes>> {
        Outgoing {
            head: GET,
            head_request: false,
            body: None,
            chunked: false,
        }
    }

    fn instance(addr: SocketAddr) -> Arc<InstanceState> {
        Arc::new(InstanceState::new("a", addr, Arc::new(Notify::new())))
    }

    fn body(exchange: Exchange, instance: &Arc<InstanceState>) -> PooledBody {
        exchange.into_response(instance.clone(), 4).into_body()
    }

    async fn read_body(exchange: Exchange, instance: &Arc<InstanceState>) -> Bytes {
        body(exchange, instance).collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_connection_read_whole_is_reused_one_dropped_early_is_not() {
        let (addr, accepted) = backend("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello").await;
        let instance = instance(addr);
        let config = config();
        for _ in 0..3 {
            let exchange = send(&config, &instance, get()).await.unwrap();
            assert_eq!(read_body(exchange, &instance).await, "hello");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert_eq!(instance.conns.len(), 1);

        let exchange = send(&config, &instance, get()).await.unwrap();
        drop(body(exchange, &instance));
        // Dropped before its end (the body was not read): not kept.
        assert_eq!(instance.conns.len(), 0);
    }

    #[tokio::test]
    async fn a_chunked_body_is_read_through_and_the_connection_kept() {
        let (addr, accepted) = backend(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .await;
        let instance = instance(addr);
        for _ in 0..2 {
            let exchange = send(&config(), &instance, get()).await.unwrap();
            assert!(
                exchange
                    .head
                    .response
                    .headers()
                    .get("transfer-encoding")
                    .is_none()
            );
            assert_eq!(read_body(exchange, &instance).await, "abcde");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn connections_that_must_not_be_kept_are_not() {
        for response in [
            "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok",
            "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            // Bytes after the body nobody asked for.
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n",
        ] {
            let (addr, _) = backend(response).await;
            let instance = instance(addr);
            let exchange = send(&config(), &instance, get()).await.unwrap();
            assert_eq!(read_body(exchange, &instance).await, "ok", "{response:?}");
            assert_eq!(instance.conns.len(), 0, "{response:?}");
        }
    }

    #[tokio::test]
    async fn a_body_to_the_close_ends_with_the_connection() {
        let (addr, _) = serve_each(|mut stream, _| async move {
            read_head_bytes(&mut stream).await;
            stream
                .write_all(b"HTTP/1.1 200 OK\r\n\r\nsome")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.write_all(b" more").await.unwrap();
        })
        .await;
        let instance = instance(addr);
        let exchange = send(&config(), &instance, get()).await.unwrap();
        assert!(!exchange.head.keep_alive);
        assert_eq!(read_body(exchange, &instance).await, "some more");
        assert_eq!(instance.conns.len(), 0);
    }

    #[tokio::test]
    async fn a_body_cut_short_by_the_close_is_an_error() {
        let (addr, _) = serve_each(|mut stream, _| async move {
            read_head_bytes(&mut stream).await;
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort")
                .await
                .unwrap();
        })
        .await;
        let instance = instance(addr);
        let exchange = send(&config(), &instance, get()).await.unwrap();
        let mut body = body(exchange, &instance);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "short");
        let end = body.frame().await.unwrap();
        assert!(end.is_err(), "{end:?}");
        drop(body);
        assert_eq!(instance.conns.len(), 0);
    }

    /// A connection the instance closed while it sat idle in the pool
    /// takes no request: the request, even one with a body, goes on a new
    /// connection.
    #[tokio::test]
    async fn a_request_taking_a_connection_closed_while_idle_goes_on_a_new_one() {
        let close = Arc::new(Notify::new());
        let closing = close.clone();
        let (addr, accepted) = serve_each(move |mut stream, _| {
            let closing = closing.clone();
            async move {
                // One answer (keep-alive, as far as the client knows),
                // then the connection closes when told.
                if read_head_bytes(&mut stream).await.is_none() {
                    return;
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                closing.notified().await;
            }
        })
        .await;
        let instance = instance(addr);
        let config = config();
        let exchange = send(&config, &instance, get()).await.unwrap();
        assert_eq!(read_body(exchange, &instance).await, "ok");
        assert_eq!(
            instance.conns.len(),
            1,
            "kept: the instance said nothing of closing"
        );
        close.notify_waiters();
        tokio::time::sleep(Duration::from_millis(100)).await; // the FIN arrives

        let post = Outgoing {
            head: b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\n",
            head_request: false,
            body: Some(Full::new(Bytes::from_static(b"data"))),
            chunked: false,
        };
        let exchange = send(&config, &instance, post).await.unwrap();
        assert_eq!(read_body(exchange, &instance).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// Bytes an instance sends on a kept connection after the response
    /// (a buggy or hostile instance) must not become the answer to the
    /// next request: the connection is dropped when taken.
    #[tokio::test]
    async fn a_connection_with_late_stray_bytes_is_not_reused() {
        let (addr, accepted) = serve_each(|mut stream, n| async move {
            read_head_bytes(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst")
                .await;
            if n == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray")
                    .await;
            }
            read_head_bytes(&mut stream).await;
        })
        .await;
        let instance = instance(addr);
        let exchange = send(&config(), &instance, get()).await.unwrap();
        assert_eq!(read_body(exchange, &instance).await, "first");
        assert_eq!(instance.conns.len(), 1);
        tokio::time::sleep(Duration::from_millis(150)).await;
        let exchange = send(&config(), &instance, get()).await.unwrap();
        assert_eq!(read_body(exchange, &instance).await, "first");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    /// A chunked request body arrives as chunks, and the response head is
    /// read while it is sent.
    #[tokio::test]
    async fn a_request_body_goes_chunked() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Mutex::new(Some(tx));
        let (addr, _) = serve_each(move |mut stream, _| {
            let tx = tx.lock().unwrap().take();
            async move {
                let mut have = Vec::new();
                let mut buf = [0u8; 4096];
                while !have.ends_with(b"0\r\n\r\n") {
                    let n = stream.read(&mut buf).await.unwrap();
                    assert!(n > 0);
                    have.extend_from_slice(&buf[..n]);
                }
                stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tx.unwrap().send(have);
            }
        })
        .await;
        let instance = instance(addr);
        let request = Outgoing {
            head: b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
            head_request: false,
            body: Some(Full::new(Bytes::from_static(b"0123456789abcdefg"))),
            chunked: true,
        };
        let exchange = send(&config(), &instance, request).await.unwrap();
        assert_eq!(exchange.head.response.status(), StatusCode::OK);
        let wire = rx.await.unwrap();
        assert!(
            wire.ends_with(b"\r\n\r\n11\r\n0123456789abcdefg\r\n0\r\n\r\n"),
            "{}",
            String::from_utf8_lossy(&wire)
        );
    }

    /// An instance that answers before it has the whole request body, and
    /// streams its response while the request streams (an echo): the
    /// body goes on being sent while the response is read, and the
    /// connection is kept once both have ended.
    #[tokio::test]
    async fn a_response_streams_while_the_request_body_still_does() {
        let (addr, _) = serve_each(|mut stream, _| async move {
            let mut have = read_head_bytes(&mut stream).await.unwrap();
            let mut buf = [0u8; 4096];
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            // Echoes what arrives (chunk framing and all) as chunks of its
            // own, and ends when the request's last chunk has come.
            let mut seen =
                have.split_off(have.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4);
            loop {
                if !seen.is_empty() {
                    let mut chunk = format!("{:x}\r\n", seen.len()).into_bytes();
                    chunk.extend_from_slice(&seen);
                    chunk.extend_from_slice(b"\r\n");
                    stream.write_all(&chunk).await.unwrap();
                    if seen.ends_with(b"0\r\n\r\n") {
                        stream.write_all(b"0\r\n\r\n").await.unwrap();
                        break;
                    }
                }
                let n = stream.read(&mut buf).await.unwrap();
                seen = buf[..n].to_vec();
            }
            // Kept open: the proxy decides whether to keep it.
            let _ = stream.read(&mut buf).await;
        })
        .await;
        let instance = instance(addr);
        let (mut tx, channel) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
        let request = Outgoing {
            head: b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
            head_request: false,
            body: Some(channel),
            chunked: true,
        };
        let exchange =
            tokio::time::timeout(Duration::from_secs(5), send(&config(), &instance, request))
                .await
                .expect("the head comes before the body's end")
                .unwrap();
        assert!(exchange.writer.is_some(), "the body is still being sent");
        let mut body = body(exchange, &instance);
        let mut echoed = Vec::new();
        for ping in ["ping-1", "ping-2"] {
            tx.send_data(Bytes::from_static(ping.as_bytes()))
                .await
                .unwrap();
            while !String::from_utf8_lossy(&echoed).contains(ping) {
                let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                    .await
                    .expect("the echo comes while the request is open")
                    .unwrap()
                    .unwrap();
                echoed.extend_from_slice(&frame.into_data().unwrap());
            }
        }
        drop(tx);
        while let Some(frame) = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .unwrap()
        {
            frame.unwrap();
        }
        drop(body);
        assert_eq!(instance.conns.len(), 1, "both ended: kept");
    }

    /// The instance answers (204) at once and reads the upload after: the
    /// upload still reaches it whole once the response is done with.
    #[tokio::test]
    async fn an_upload_goes_on_after_an_early_response() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let tx = Mutex::new(Some(tx));
        let (addr, _) = serve_each(move |mut stream, _| {
            let tx = tx.lock().unwrap().take();
            async move {
                let mut have = read_head_bytes(&mut stream).await.unwrap();
                let mut buf = [0u8; 4096];
                stream
                    .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                    .await
                    .unwrap();
                while !have.ends_with(b"0\r\n\r\n") {
                    let n = stream.read(&mut buf).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    have.extend_from_slice(&buf[..n]);
                }
                let _ = tx.unwrap().send(have);
            }
        })
        .await;
        let instance = instance(addr);
        let (mut sender, channel) = http_body_util::channel::Channel::<Bytes, BoxError>::new(1);
        let request = Outgoing {
            head: b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
            head_request: false,
            body: Some(channel),
            chunked: true,
        };
        let exchange = send(&config(), &instance, request).await.unwrap();
        assert_eq!(exchange.head.response.status(), StatusCode::NO_CONTENT);
        drop(body(exchange, &instance)); // no body: done at once
        sender.send_data(Bytes::from_static(b"late")).await.unwrap();
        drop(sender);
        let wire = tokio::time::timeout(Duration::from_secs(5), rx)
            .await
            .expect("the upload ends")
            .unwrap();
        assert!(
            wire.ends_with(b"4\r\nlate\r\n0\r\n\r\n"),
            "{}",
            String::from_utf8_lossy(&wire)
        );
        assert_eq!(instance.conns.len(), 0, "not kept: it was busy uploading");
    }

    /// A kept connection that the instance closes after it has read a
    /// request, without answering: the request is not sent again here (not
    /// even a GET: that is `forward`'s to do, on another instance), and
    /// the instance has seen it once.
    #[tokio::test]
    async fn a_request_that_got_no_answer_is_not_sent_again_here() {
        let seen = Arc::new(AtomicUsize::new(0));
        let counted = seen.clone();
        let (addr, _) = serve_each(move |mut stream, _| {
            let counted = counted.clone();
            async move {
                let mut answered = false;
                while read_head_bytes(&mut stream).await.is_some() {
                    counted.fetch_add(1, Ordering::SeqCst);
                    if answered {
                        return; // reads the second request, closes
                    }
                    answered = true;
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            }
        })
        .await;
        let instance = instance(addr);
        let exchange = send(&config(), &instance, get()).await.unwrap();
        assert_eq!(read_body(exchange, &instance).await, "ok");
        seen.store(0, Ordering::SeqCst);
        let e = send(&config(), &instance, get()).await.unwrap_err();
        assert!(matches!(e, SendError::Unanswered(_)), "{e}");
        assert_eq!(seen.load(Ordering::SeqCst), 1, "sent once");
    }

    #[tokio::test]
    async fn interim_responses_are_skipped_and_a_slow_head_times_out() {
        let (addr, _) = backend(
            "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx",
        )
        .await;
        let hinted = instance(addr);
        let exchange = send(&config(), &hinted, get()).await.unwrap();
        assert_eq!(exchange.head.response.status(), StatusCode::OK);
        assert_eq!(read_body(exchange, &hinted).await, "x");

        let (addr, _) = serve_each(|stream, _| async move {
            let _held_open = stream; // and never answered
            tokio::time::sleep(Duration::from_secs(10)).await;
        })
        .await;
        let config = PoolConfig {
            response_timeout: Duration::from_millis(100),
            body_stall: Duration::from_secs(5),
            ..config()
        };
        let e = send(&config, &instance(addr), get()).await.unwrap_err();
        assert!(matches!(e, SendError::Timeout), "{e}");
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = send(&config(), &instance(addr), get()).await.unwrap_err();
        assert!(e.is_connect(), "{e}");
    }

    #[tokio::test]
    async fn the_sweep_closes_idle_connections() {
        let (addr, _) = backend("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx").await;
        let instance = instance(addr);
        let exchange = send(&config(), &instance, get()).await.unwrap();
        read_body(exchange, &instance).await;
        assert_eq!(instance.conns.len(), 1);
        instance.conns.sweep(Duration::from_secs(60));
        assert_eq!(instance.conns.len(), 1);
        instance.conns.sweep(Duration::ZERO);
        assert_eq!(instance.conns.len(), 0);
    }
}
