//! A point where a test holds a task: the task says it got there, then waits to be let go.

use std::time::Duration;

use tokio::sync::Notify;

/// How long [`Gate::reached`] waits: only a hang reaches it.
const GATE_HANG: Duration = Duration::from_secs(20);

/// A point where a test holds a load (or any other step): the held task says it got there,
/// then waits to be let go.
#[derive(Debug, Default)]
pub struct Gate {
    reached: Notify,
    release: Notify,
}

impl Gate {
    /// In the held task: says it got here, then waits for [`open`](Self::open).
    pub async fn pause(&self) {
        self.reached.notify_one();
        self.release.notified().await;
    }

    /// In the test: waits until the held task is at the gate (panics after 20 s).
    pub async fn reached(&self) {
        tokio::time::timeout(GATE_HANG, self.reached.notified())
            .await
            .expect("the held task never reached the gate");
    }

    /// Lets the held task go.
    pub fn open(&self) {
        self.release.notify_one();
    }
}
