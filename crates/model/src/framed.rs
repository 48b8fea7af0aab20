//! One framed connection with heartbeats and silence detection: the
//! master–minion link as both ends run it.
//!
//! [`spawn`] takes the two halves of a stream and starts two tasks:
//! - a writer fed by a channel ([`FrameSender`]), which sends the heartbeat
//!   message whenever nothing else went out for one heartbeat interval;
//! - a reader that decodes frames into a bounded channel
//!   ([`FrameReceiver`]), so that reading (which is not cancel-safe) never
//!   sits in a caller's `select!`.
//!
//! [`FrameReceiver::recv`] is cancel-safe and ends the link with a
//! [`LinkDrop`] that names why: the other end closed it, it was silent
//! longer than the silence timeout, a frame could not be read or written,
//! or this side let go of every sender. Dropping the receiver ends both
//! tasks, which closes the connection.
//!
//! A message is encoded when it is sent, so one too large for a frame is
//! refused to the sender ([`SendError`]) and never reaches the wire: the
//! connection stays usable and the caller can say which message it was.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::proto::{FrameError, encode_frame, read_frame};

/// How often a side speaks when it has nothing to say, and how long it
/// waits on a silent peer before it gives the link up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkTiming {
    pub heartbeat: Duration,
    pub silence: Duration,
}

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkDrop {
    #[error("the other end closed the connection")]
    PeerClosed,
    #[error("closed on this side")]
    LocalClose,
    #[error("no heartbeat for {} ms", .0.as_millis())]
    Silent(Duration),
    #[error("reading a frame: {0}")]
    Read(FrameError),
    #[error("writing a frame: {0}")]
    Write(FrameError),
}

/// Why a message was not queued for sending.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Not encodable, or larger than a frame may be; nothing was sent and
    /// the link goes on.
    #[error("cannot send the message: {0}")]
    Encode(#[from] FrameError),
    #[error("cannot send the message: the link is closed")]
    Closed,
}

/// A message encoded as a whole frame (length prefix included), ready to
/// be sent on any number of links without encoding it again.
pub struct EncodedFrame<T> {
    bytes: Arc<[u8]>,
    _message: PhantomData<fn(T)>,
}

impl<T> Clone for EncodedFrame<T> {
    fn clone(&self) -> Self {
        EncodedFrame {
            bytes: self.bytes.clone(),
            _message: PhantomData,
        }
    }
}

impl<T: Serialize> EncodedFrame<T> {
    /// Encodes `msg`; a frame body over `limit` bytes is refused.
    pub fn new(msg: &T, limit: usize) -> Result<Self, FrameError> {
        Ok(EncodedFrame {
            bytes: encode_frame(msg, limit)?.into(),
            _message: PhantomData,
        })
    }
}

impl<T> EncodedFrame<T> {
    /// Bytes on the wire, length prefix included.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The sending end of a link; cheap to clone. When every clone is gone the
/// writer closes its half of the connection.
pub struct FrameSender<Out> {
    frames: mpsc::UnboundedSender<Arc<[u8]>>,
    limit: usize,
    _message: PhantomData<fn(Out)>,
}

impl<Out> Clone for FrameSender<Out> {
    fn clone(&self) -> Self {
        FrameSender {
            frames: self.frames.clone(),
            limit: self.limit,
            _message: PhantomData,
        }
    }
}

impl<Out: Serialize> FrameSender<Out> {
    /// Encodes and queues `msg`.
    pub fn send(&self, msg: &Out) -> Result<(), SendError> {
        self.send_encoded(&EncodedFrame::new(msg, self.limit)?)
    }

    /// Queues a frame encoded once for several links.
    pub fn send_encoded(&self, frame: &EncodedFrame<Out>) -> Result<(), SendError> {
        self.frames
            .send(frame.bytes.clone())
            .map_err(|_| SendError::Closed)
    }

    /// The largest frame body this link sends.
    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// The receiving end of a link; dropping it closes the connection.
pub struct FrameReceiver<In> {
    frames: mpsc::Receiver<Result<In, LinkDrop>>,
    /// How the writer ended, if it ended on its own.
    writer_end: oneshot::Receiver<LinkDrop>,
    writer_ended: bool,
    silence: Duration,
    heard: Instant,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl<In> Drop for FrameReceiver<In> {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl<In> FrameReceiver<In> {
    /// The next message (heartbeats included), or why the link ended.
    /// Cancel-safe: a message is never lost to a `select!` that drops this
    /// future. After an error the link is over; drop it.
    pub async fn recv(&mut self) -> Result<In, LinkDrop> {
        let deadline = self.heard + self.silence;
        tokio::select! {
            // Frames already read count even if the caller comes late.
            biased;
            frame = self.frames.recv() => match frame {
                Some(Ok(msg)) => {
                    self.heard = Instant::now();
                    Ok(msg)
                }
                Some(Err(drop)) => Err(drop),
                // The reader ends only after sending why.
                None => Err(LinkDrop::PeerClosed),
            },
            end = &mut self.writer_end, if !self.writer_ended => {
                self.writer_ended = true;
                Err(end.unwrap_or(LinkDrop::LocalClose))
            }
            () = tokio::time::sleep_until(deadline) => Err(LinkDrop::Silent(self.silence)),
        }
    }
}

/// Runs a link over `reader` and `writer` (the halves of one connection):
/// `heartbeat` goes out whenever nothing else did for `timing.heartbeat`,
/// and frames of more than `limit` bytes are neither sent nor accepted.
/// Must be called within a tokio runtime.
pub fn spawn<In, Out, R, W>(
    reader: R,
    writer: W,
    heartbeat: &Out,
    timing: LinkTiming,
    limit: usize,
) -> Result<(FrameSender<Out>, FrameReceiver<In>), FrameError>
where
    In: DeserializeOwned + Send + 'static,
    Out: Serialize,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let heartbeat = EncodedFrame::new(heartbeat, limit)?.bytes;
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (end_tx, end_rx) = oneshot::channel();
    let (in_tx, in_rx) = mpsc::channel(16);
    let writer = tokio::spawn(write_frames(
        writer,
        out_rx,
        heartbeat,
        timing.heartbeat,
        end_tx,
    ));
    let reader = tokio::spawn(read_frames(reader, in_tx, limit));
    Ok((
        FrameSender {
            frames: out_tx,
            limit,
            _message: PhantomData,
        },
        FrameReceiver {
            frames: in_rx,
            writer_end: end_rx,
            writer_ended: false,
            silence: timing.silence,
            heard: Instant::now(),
            reader,
            writer,
        },
    ))
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut w: W,
    mut frames: mpsc::UnboundedReceiver<Arc<[u8]>>,
    heartbeat: Arc<[u8]>,
    every: Duration,
    end: oneshot::Sender<LinkDrop>,
) {
    let idle = tokio::time::sleep(every);
    tokio::pin!(idle);
    let why = loop {
        let frame = tokio::select! {
            frame = frames.recv() => match frame {
                Some(f) => f,
                None => break LinkDrop::LocalClose,
            },
            () = &mut idle => heartbeat.clone(),
        };
        let written = async {
            w.write_all(&frame).await?;
            w.flush().await
        };
        if let Err(e) = written.await {
            break LinkDrop::Write(FrameError::Io(e));
        }
        idle.as_mut().reset(Instant::now() + every);
    };
    // Tell the other end we are done (it reads end of stream).
    let _ = w.shutdown().await;
    let _ = end.send(why);
}

async fn read_frames<R, In>(mut r: R, frames: mpsc::Sender<Result<In, LinkDrop>>, limit: usize)
where
    R: AsyncRead + Unpin,
    In: DeserializeOwned,
{
    loop {
        let (item, last) = match read_frame::<_, In>(&mut r, limit).await {
            Ok(Some(msg)) => (Ok(msg), false),
            Ok(None) => (Err(LinkDrop::PeerClosed), true),
            Err(e) => (Err(LinkDrop::Read(e)), true),
        };
        if frames.send(item).await.is_err() || last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

    #[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
    enum Msg {
        Beat,
        Text(String),
    }

    const TIMING: LinkTiming = LinkTiming {
        heartbeat: Duration::from_millis(100),
        silence: Duration::from_millis(300),
    };

    fn link(stream: DuplexStream) -> (FrameSender<Msg>, FrameReceiver<Msg>) {
        let (r, w) = tokio::io::split(stream);
        spawn(r, w, &Msg::Beat, TIMING, 1 << 10).unwrap()
    }

    /// The raw other end: frames read and written by hand.
    fn raw(stream: DuplexStream) -> (ReadHalf<DuplexStream>, WriteHalf<DuplexStream>) {
        tokio::io::split(stream)
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_go_out_only_while_idle() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (tx, _rx) = link(a);
        let (mut peer, _peer_w) = raw(b);
        let start = Instant::now();
        let first: Msg = read_frame(&mut peer, 1 << 10).await.unwrap().unwrap();
        assert_eq!(first, Msg::Beat);
        assert_eq!(start.elapsed(), TIMING.heartbeat);
        // A message resets the idle timer: the next beat comes one whole
        // interval after it.
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(&Msg::Text("hi".into())).unwrap();
        let sent_at = Instant::now();
        let msg: Msg = read_frame(&mut peer, 1 << 10).await.unwrap().unwrap();
        assert_eq!(msg, Msg::Text("hi".into()));
        let beat: Msg = read_frame(&mut peer, 1 << 10).await.unwrap().unwrap();
        assert_eq!(beat, Msg::Beat);
        assert_eq!(sent_at.elapsed(), TIMING.heartbeat);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_is_dropped_after_the_timeout() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (_tx, mut rx) = link(a);
        // The peer keeps the connection open and says nothing.
        let _peer = raw(b);
        let start = Instant::now();
        let why = rx.recv().await.unwrap_err();
        assert!(
            matches!(why, LinkDrop::Silent(d) if d == TIMING.silence),
            "{why}"
        );
        assert_eq!(start.elapsed(), TIMING.silence);
        assert_eq!(why.to_string(), "no heartbeat for 300 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn frames_flow_both_ways_and_heartbeats_keep_the_link() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (a_tx, mut a_rx) = link(a);
        let (b_tx, mut b_rx) = link(b);
        a_tx.send(&Msg::Text("down".into())).unwrap();
        b_tx.send(&Msg::Text("up".into())).unwrap();
        assert_eq!(b_rx.recv().await.unwrap(), Msg::Text("down".into()));
        assert_eq!(a_rx.recv().await.unwrap(), Msg::Text("up".into()));
        // Ten silence timeouts with nothing but heartbeats: still up.
        let until = Instant::now() + TIMING.silence * 10;
        while Instant::now() < until {
            assert_eq!(a_rx.recv().await.unwrap(), Msg::Beat);
        }
        a_tx.send(&Msg::Text("later".into())).unwrap();
        let mut got = b_rx.recv().await.unwrap();
        while got == Msg::Beat {
            got = b_rx.recv().await.unwrap();
        }
        assert_eq!(got, Msg::Text("later".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_one_end_closes_both_halves_for_the_other() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (a_tx, a_rx) = link(a);
        let (b_tx, mut b_rx) = link(b);
        drop((a_tx, a_rx));
        let why = b_rx.recv().await.unwrap_err();
        assert!(matches!(why, LinkDrop::PeerClosed), "{why}");
        // Its next write (a heartbeat) finds the connection gone too: the
        // writer ends and takes no more messages.
        tokio::time::sleep(TIMING.heartbeat * 2).await;
        let err = b_tx.send(&Msg::Beat).unwrap_err();
        assert!(matches!(err, SendError::Closed), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn letting_go_of_every_sender_ends_the_link_on_both_sides() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (a_tx, mut a_rx) = link(a);
        let (_b_tx, mut b_rx) = link(b);
        drop(a_tx);
        let why = a_rx.recv().await.unwrap_err();
        assert!(matches!(why, LinkDrop::LocalClose), "{why}");
        let why = b_rx.recv().await.unwrap_err();
        assert!(matches!(why, LinkDrop::PeerClosed), "{why}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_oversized_message_is_refused_and_the_link_goes_on() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (a_tx, _a_rx) = link(a);
        let (_b_tx, mut b_rx) = link(b);
        let err = a_tx.send(&Msg::Text("x".repeat(2000))).unwrap_err();
        assert!(
            matches!(err, SendError::Encode(FrameError::TooLarge(n, 1024)) if n > 2000),
            "{err}"
        );
        assert!(
            err.to_string().contains("larger than the limit of 1024"),
            "{err}"
        );
        a_tx.send(&Msg::Text("small".into())).unwrap();
        assert_eq!(b_rx.recv().await.unwrap(), Msg::Text("small".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_oversized_incoming_frame_ends_the_link_naming_it() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (_a_tx, mut a_rx) = link(a);
        let (_peer_r, mut peer_w) = raw(b);
        crate::proto::write_frame(&mut peer_w, &Msg::Text("y".repeat(2000)))
            .await
            .unwrap();
        let why = a_rx.recv().await.unwrap_err();
        assert!(
            matches!(why, LinkDrop::Read(FrameError::TooLarge(_, 1024))),
            "{why}"
        );
    }
}
