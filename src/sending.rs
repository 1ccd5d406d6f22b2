//! Sending on a bounded channel from a task that lives as long as a link.
//!
//! A future is as large as its largest await: awaiting `Sender::send` directly sizes a link's reader
//! task for a wait that almost never happens (about 500 bytes for one send, held by every link for its
//! whole life). [`send`] tries at once and only a wait for room, when the channel is full, is boxed.

use std::future::Future;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

/// The receiving side is gone.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Closed;

/// `sender.send(value)`, in the same order as other sends from this task. The value is offered when
/// this is called; the returned future waits for room if there was none.
pub(crate) fn send<'a, T: Send + 'a>(
    sender: &'a Sender<T>,
    value: T,
) -> impl Future<Output = Result<(), Closed>> + Send + 'a {
    let wait = match sender.try_send(value) {
        Ok(()) => None,
        Err(TrySendError::Full(value)) => Some(Ok(Box::pin(sender.send(value)))),
        Err(TrySendError::Closed(_)) => Some(Err(Closed)),
    };
    async move {
        match wait {
            None => Ok(()),
            Some(Ok(waiting)) => waiting.await.map_err(|_| Closed),
            Some(Err(closed)) => Err(closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    #[tokio::test]
    async fn a_full_channel_is_waited_out_in_order_and_a_closed_one_is_an_error() {
        let (tx, mut rx) = mpsc::channel(1);
        send(&tx, 1).await.unwrap();
        let waiting = tokio::spawn({
            let tx = tx.clone();
            async move { send(&tx, 2).await }
        });
        assert_eq!(rx.recv().await, Some(1));
        waiting.await.unwrap().unwrap();
        assert_eq!(rx.recv().await, Some(2));
        drop(rx);
        assert_eq!(send(&tx, 3).await, Err(Closed));
    }
}
