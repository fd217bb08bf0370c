//! The messages of the VMM: what ends it ([`VmmEvent`]), what its control loop waits for
//! ([`Control`]), and where the library reports events ([`EventSender`]). Below both the library
//! ([`crate::Vmm`], [`crate::Service`]) and the control loop ([`crate::control`]), which both
//! name them.

use std::sync::mpsc::{self, Sender};

use crate::api::{ApiError, ApiRequest, ApiResponse};
use crate::vcpu::VmEvent;

/// Where the answer to one API request goes: the connection thread waiting for it.
pub type Reply = mpsc::Sender<Result<ApiResponse, ApiError>>;

/// What the control thread waits for.
pub enum Control {
    /// An event that ends the VMM.
    Event(VmmEvent),
    /// An API request to run, and where to send its answer.
    Api(ApiRequest, Reply),
}

/// What ends the VMM process (sent to the main thread).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmEvent {
    /// `PUT /api/v1/vmm.shutdown`.
    ApiShutdown,
    /// SIGINT or SIGTERM.
    Signal,
    /// The VM stopped on its own.
    Vm(VmEvent),
}

/// Where the VMM library reports a [`VmmEvent`]: a plain channel of events (an embedder's), or
/// the control loop's channel ([`Controller::events`]), which takes them without a
/// forwarding thread.
#[derive(Clone, Debug)]
pub struct EventSender(EventSink);

#[derive(Clone, Debug)]
enum EventSink {
    Events(Sender<VmmEvent>),
    Control(Sender<Control>),
}

impl EventSender {
    /// Report `ev`; false when nobody listens any more.
    pub fn send(&self, ev: VmmEvent) -> bool {
        match &self.0 {
            EventSink::Events(tx) => tx.send(ev).is_ok(),
            EventSink::Control(tx) => tx.send(Control::Event(ev)).is_ok(),
        }
    }
}

impl From<Sender<VmmEvent>> for EventSender {
    fn from(tx: Sender<VmmEvent>) -> Self {
        Self(EventSink::Events(tx))
    }
}

impl From<Sender<Control>> for EventSender {
    fn from(tx: Sender<Control>) -> Self {
        Self(EventSink::Control(tx))
    }
}
