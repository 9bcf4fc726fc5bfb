//! Spilling a transfer that outgrows its memory share to disk, encrypted.
//!
//! A C-STORE dataset (PS3.7 §9.1.1) or a STOW-RS part (PS3.18 §10.5) is
//! first buffered in memory under its transfer's [`Reservation`]. When that
//! cannot grow (the dataset is larger than `transfer_budget_mib`, or the
//! global memory budget is in use), the front end moves it to a [`Spill`]:
//! an encrypted, anonymous spool file ([`bastion_store::Spool`]) under a
//! disk budget of its own (`[limits] spool_budget_mib`), and the ingest
//! reads it from there ([`crate::Received::SpooledNetwork`],
//! [`crate::Received::SpooledFile`]). Memory then stays bounded for
//! legitimate large instances (whole-slide images, long cine) as well as for
//! bombs, and no byte of them reaches the disk in plaintext.

use std::ops::Deref;

use bastion_store::{Spool, Spooled, StoreError};

use crate::{
    budget::{BudgetError, Reservation},
    ArchiveError,
};

/// A transfer being spilled: append its bytes, then [`finish`](Spill::finish).
#[derive(Debug)]
pub struct Spill {
    spool: Spool,
    disk: Reservation,
}

impl Spill {
    pub(crate) fn new(spool: Spool, disk: Reservation) -> Spill {
        Spill { spool, disk }
    }

    /// Bytes spilled so far.
    pub fn len(&self) -> u64 {
        self.spool.len()
    }

    /// Whether nothing was spilled yet.
    pub fn is_empty(&self) -> bool {
        self.spool.is_empty()
    }

    /// Appends `bytes`, first growing the disk reservation.
    ///
    /// # Errors
    /// [`ArchiveError::TooLarge`] past `max_dataset_bytes` (one spill's
    /// share of the disk budget), [`ArchiveError::SpoolFull`] when the spool
    /// budget is in use by other transfers, [`ArchiveError::NoSpace`] when
    /// the disk is full, [`ArchiveError::Internal`] for other I/O errors.
    /// The spill is of no further use after an error: drop it.
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), ArchiveError> {
        self.disk.grow(bytes.len() as u64).map_err(|e| match e {
            BudgetError::TransferLimit { limit } => ArchiveError::TooLarge { limit },
            BudgetError::Exhausted { limit } => ArchiveError::SpoolFull { limit },
        })?;
        self.spool.append(bytes).map_err(spool_err)
    }

    /// The spilled bytes, ready for ingest.
    ///
    /// # Errors
    /// As [`append`](Spill::append).
    pub fn finish(self) -> Result<SpooledData, ArchiveError> {
        Ok(SpooledData {
            spooled: self.spool.finish().map_err(spool_err)?,
            _disk: self.disk,
        })
    }
}

/// A finished spill: the [`Spooled`] bytes and the share of the disk budget
/// they hold, both given back when this is dropped.
#[derive(Debug)]
pub struct SpooledData {
    spooled: Spooled,
    _disk: Reservation,
}

impl Deref for SpooledData {
    type Target = Spooled;

    fn deref(&self) -> &Spooled {
        &self.spooled
    }
}

fn spool_err(e: StoreError) -> ArchiveError {
    match e {
        StoreError::NoSpace { .. } => ArchiveError::NoSpace,
        other => ArchiveError::Internal(format!("ingest spool: {other}")),
    }
}
