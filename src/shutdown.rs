//! The stop signal: fires once, on SIGINT/SIGTERM or `tunnel down`. It is
//! passed in to everything that runs until then, so that tests can fire it.

use std::future::Future;
use std::sync::Arc;
use tokio::sync::watch;

/// Clone it into every task that must stop.
#[derive(Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        let (tx, rx) = watch::channel(false);
        Self {
            rx,
            tx: Arc::new(tx),
        }
    }

    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }

    pub fn is_triggered(&self) -> bool {
        *self.rx.borrow()
    }

    pub async fn wait(&mut self) {
        let _ = self.rx.wait_for(|stop| *stop).await;
    }

    /// A `'static` future that completes on shutdown.
    pub fn waiter(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut me = self.clone();
        async move { me.wait().await }
    }

    /// A trigger for the local API's `down`.
    pub fn trigger_fn(&self) -> Arc<dyn Fn() + Send + Sync> {
        let me = self.clone();
        Arc::new(move || me.trigger())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_the_trigger() {
        let s = Shutdown::new();
        let w = s.waiter();
        assert!(!s.is_triggered());
        s.clone().trigger();
        w.await;
        assert!(s.is_triggered());
    }
}
