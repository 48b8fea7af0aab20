//! Where the proxy is in its life, and the wait for it to move on.
//!
//! Every client connection's task waits for shutdown beside its HTTP
//! work, and is polled at every wake-up (a few times a request). A
//! `watch` receiver's wait takes a lock at each of those polls; a
//! [`PhaseWait`] registers its task's waker once and is then an atomic
//! load a poll.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll, Waker};

/// Where the proxy is in its life; it only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Phase {
    Running = 0,
    /// Stop accepting; connections finish what is in flight.
    Draining = 1,
    /// Drop everything.
    Stopped = 2,
}

/// The current phase and the tasks waiting for a later one.
#[derive(Debug)]
pub(crate) struct PhaseBell {
    phase: AtomicU8,
    waiting: Mutex<Waiting>,
}

/// Registered wakers in reusable slots.
#[derive(Debug, Default)]
struct Waiting {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl Default for PhaseBell {
    fn default() -> Self {
        PhaseBell {
            phase: AtomicU8::new(Phase::Running as u8),
            waiting: Mutex::default(),
        }
    }
}

impl PhaseBell {
    #[cfg(test)]
    pub fn get(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Running,
            1 => Phase::Draining,
            _ => Phase::Stopped,
        }
    }

    /// Moves to `phase` unless the proxy is there or past it already;
    /// wakes every waiter if it moved. Whether it moved.
    pub fn advance(&self, phase: Phase) -> bool {
        let before = self.phase.fetch_max(phase as u8, Ordering::AcqRel);
        if before >= phase as u8 {
            return false;
        }
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        for waker in waiting.slots.iter().flatten() {
            waker.wake_by_ref();
        }
        true
    }

    /// Resolves once the proxy is at `at_least` or past it.
    pub fn reached(&self, at_least: Phase) -> PhaseWait<'_> {
        PhaseWait {
            bell: self,
            at_least: at_least as u8,
            slot: None,
        }
    }
}

/// See [`PhaseBell::reached`].
#[derive(Debug)]
pub(crate) struct PhaseWait<'a> {
    bell: &'a PhaseBell,
    at_least: u8,
    /// The slot this wait's waker is in, and a copy to compare.
    slot: Option<(usize, Waker)>,
}

impl Future for PhaseWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let bell = self.bell;
        if bell.phase.load(Ordering::Acquire) >= self.at_least {
            return Poll::Ready(());
        }
        if !matches!(&self.slot, Some((_, waker)) if waker.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            let mut waiting = bell.waiting.lock().unwrap_or_else(|e| e.into_inner());
            let index = match self.slot {
                Some((index, _)) => index,
                None => match waiting.free.pop() {
                    Some(index) => index,
                    None => {
                        waiting.slots.push(None);
                        waiting.slots.len() - 1
                    }
                },
            };
            waiting.slots[index] = Some(waker.clone());
            drop(waiting);
            self.slot = Some((index, waker));
            // Looked at again now that the waker is in: an `advance`
            // between the first look and the registration found no waker
            // to wake, but its phase is visible here (the lock orders
            // the two).
            if bell.phase.load(Ordering::Acquire) >= self.at_least {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

impl Drop for PhaseWait<'_> {
    fn drop(&mut self) {
        if let Some((index, _)) = self.slot.take() {
            let mut waiting = self.bell.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.slots[index] = None;
            waiting.free.push(index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn it_only_moves_forward() {
        let bell = PhaseBell::default();
        assert_eq!(bell.get(), Phase::Running);
        assert!(bell.advance(Phase::Draining));
        assert!(!bell.advance(Phase::Draining));
        assert!(!bell.advance(Phase::Running));
        assert_eq!(bell.get(), Phase::Draining);
        assert!(bell.advance(Phase::Stopped));
        assert!(!bell.advance(Phase::Draining));
        assert_eq!(bell.get(), Phase::Stopped);
    }

    #[tokio::test]
    async fn waiters_wake_when_their_phase_comes_and_not_before() {
        let bell = Arc::new(PhaseBell::default());
        let draining = tokio::spawn({
            let bell = bell.clone();
            async move { bell.reached(Phase::Draining).await }
        });
        let stopped = tokio::spawn({
            let bell = bell.clone();
            async move { bell.reached(Phase::Stopped).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!draining.is_finished() && !stopped.is_finished());
        bell.advance(Phase::Draining);
        tokio::time::timeout(Duration::from_secs(5), draining)
            .await
            .expect("woken")
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!stopped.is_finished());
        bell.advance(Phase::Stopped);
        tokio::time::timeout(Duration::from_secs(5), stopped)
            .await
            .expect("woken")
            .unwrap();
        // Done waits give their slots back.
        let waiting = bell.waiting.lock().unwrap();
        assert!(waiting.slots.iter().all(Option::is_none));
        assert_eq!(waiting.free.len(), waiting.slots.len());
    }

    #[tokio::test]
    async fn a_phase_already_reached_is_ready_at_once_and_slots_are_reused() {
        let bell = PhaseBell::default();
        for _ in 0..3 {
            let wait = bell.reached(Phase::Draining);
            tokio::pin!(wait);
            assert!(futures_poll(wait.as_mut()).is_pending());
        }
        assert_eq!(bell.waiting.lock().unwrap().slots.len(), 1);
        bell.advance(Phase::Stopped);
        let wait = bell.reached(Phase::Draining);
        tokio::pin!(wait);
        assert!(futures_poll(wait.as_mut()).is_ready());
    }

    fn futures_poll<F: Future>(future: Pin<&mut F>) -> Poll<F::Output> {
        let mut cx = Context::from_waker(Waker::noop());
        future.poll(&mut cx)
    }
}
