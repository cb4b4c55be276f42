//! A cloneable shutdown signal shared by every server and connection.

use tokio::sync::watch;

/// Fires once; every clone observes it. Dropping every [`ShutdownTrigger`] also fires it.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// The sending side of [`Shutdown`].
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

impl Shutdown {
    /// A new signal and its trigger.
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// Resolves once shutdown has been requested.
    pub async fn wait(&mut self) {
        // An error means every trigger is gone, which also means shutdown.
        let _ = self.0.wait_for(|v| *v).await;
    }

    /// True once shutdown has been requested.
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

impl ShutdownTrigger {
    /// Requests shutdown.
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }

    /// Another handle observing this trigger.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}
