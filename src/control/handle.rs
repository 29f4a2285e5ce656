//! What the admin socket, the HTTP endpoint and `weir run` hold: the published tables and
//! config to read, and a channel to ask the control task for changes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, oneshot};

use crate::balance::WEIGHT_RANGE;
use crate::config::{Config, ConfigErrors};
use crate::tables::Tables;

/// Why the control task could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("weir is shutting down")]
    ShuttingDown,
    #[error("no pool {0:?}")]
    NoPool(String),
    #[error("no backend {backend:?} in pool {pool:?}")]
    NoBackend { pool: String, backend: String },
    #[error("weight {0} is out of range {lo}..={hi}", lo = WEIGHT_RANGE.start(), hi = WEIGHT_RANGE.end())]
    WeightOutOfRange(u32),
    #[error("this instance was started without a config file")]
    NoConfigFile,
    #[error("reading the config failed: {0}")]
    ReadFailed(String),
    /// Every problem of the new file; nothing changed.
    #[error("{0}")]
    Invalid(ConfigErrors),
    /// A new listener address could not be bound; nothing changed.
    #[error("{0}; nothing changed")]
    Bind(#[from] crate::proxy::BindError),
    /// The change is in force, but would not survive a restart.
    #[error("in force now, but not saved: {0}; it will not survive a restart")]
    NotSaved(#[from] crate::state_file::StateFileError),
}

pub(super) enum Command {
    SetWeight {
        pool: String,
        backend: String,
        weight: u32,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
    /// Re-read the config file; the reply summarises what changed, or lists every problem.
    Reload {
        reply: oneshot::Sender<Result<String, ControlError>>,
    },
    /// An operator changed a backend's admin state: persist it, then reply.
    AdminChanged {
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
}

/// When the config was last loaded or reloaded, and how that went (`show info`).
#[derive(Clone, Debug)]
pub struct LoadStatus {
    /// When the control task started (about when weir started).
    pub started: SystemTime,
    pub started_at: Instant,
    /// The last load or reload attempt.
    pub at: SystemTime,
    /// None: it worked; otherwise why not (the config in force is the one before).
    pub error: Option<String>,
    /// Reload attempts since start.
    pub reloads: u64,
}

impl LoadStatus {
    pub(super) fn new() -> Self {
        let now = SystemTime::now();
        LoadStatus {
            started: now,
            started_at: Instant::now(),
            at: now,
            error: None,
            reloads: 0,
        }
    }

    /// After a reload attempt.
    pub(super) fn reloaded(&self, error: Option<String>) -> Self {
        LoadStatus {
            at: SystemTime::now(),
            error,
            reloads: self.reloads + 1,
            ..self.clone()
        }
    }
}

#[derive(Clone)]
pub struct ControlHandle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) tables: Arc<ArcSwap<Tables>>,
    pub(super) config: Arc<ArcSwap<Config>>,
    pub(super) load: Arc<ArcSwap<LoadStatus>>,
    pub config_path: Option<PathBuf>,
}

impl ControlHandle {
    pub fn tables(&self) -> Arc<Tables> {
        self.tables.load_full()
    }

    /// When the config was last (re)loaded, and whether that worked.
    pub fn load_status(&self) -> Arc<LoadStatus> {
        self.load.load_full()
    }

    /// The config in force (the last one loaded successfully).
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub async fn set_weight(
        &self,
        pool: &str,
        backend: &str,
        weight: u32,
    ) -> Result<(), ControlError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::SetWeight {
            pool: pool.into(),
            backend: backend.into(),
            weight,
            reply,
        })
        .await?;
        rx.await.map_err(|_| ControlError::ShuttingDown)?
    }

    /// Re-reads the config file and applies it; `Err` lists every problem, and then
    /// nothing has changed.
    pub async fn reload(&self) -> Result<String, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Reload { reply }).await?;
        rx.await.map_err(|_| ControlError::ShuttingDown)?
    }

    /// Tells the control task that an admin state changed, and returns once the state
    /// file (when configured) has it on disk: only then may the change be acknowledged.
    pub async fn admin_changed(&self) -> Result<(), ControlError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::AdminChanged { reply }).await?;
        rx.await.map_err(|_| ControlError::ShuttingDown)?
    }

    async fn send(&self, command: Command) -> Result<(), ControlError> {
        self.tx
            .send(command)
            .await
            .map_err(|_| ControlError::ShuttingDown)
    }
}
