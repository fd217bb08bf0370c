//! Why a clock is being restored.

use serde::{Deserialize, Serialize};

/// Why a clock is being restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThawOrigin {
    /// Resume of this VM's own last freeze, on the same host and boot.
    OwnFreeze,
    /// A restored snapshot.
    Snapshot,
    /// An incoming live migration.
    Migration,
}
