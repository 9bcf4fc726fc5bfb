//! One memory budget for everything a peer makes the server hold: the
//! dataset a C-STORE assembles from P-DATA fragments (PS3.8 §9.3.5), a
//! STOW-RS request body (PS3.18 §10.5), and the inflated form of a
//! Deflated Explicit VR Little Endian dataset (PS3.5 Annex A.5).
//!
//! [`MemoryBudget`] is the global total (`[limits] memory_budget_mib`); each
//! association or HTTP request takes a [`Reservation`] from it, capped per
//! transfer (`[limits] transfer_budget_mib`), and grows it *before* its
//! buffers grow. A reservation that cannot grow is refused at once (never
//! waits): the C-STORE answers 0xA700, the STOW-RS request 503 with
//! `Retry-After`, so N parallel deflate bombs from any mix of devices and
//! users together hold at most the global budget.
//!
//! Home-made rather than `tokio::sync::Semaphore`: the archive is
//! synchronous (ingest runs on blocking threads), a reservation grows in
//! place in bytes (a `u64`, not `u32` permits) and never waits, which is one
//! compare-and-swap on an atomic counter.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

/// Why a [`Reservation`] could not grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    /// One transfer (association dataset, request body, inflated dataset)
    /// would hold more than its cap.
    #[error("one transfer may hold at most {limit} bytes in memory")]
    TransferLimit {
        /// The per-transfer cap in bytes.
        limit: u64,
    },
    /// The global budget is in use by other transfers; retrying later may
    /// succeed.
    #[error("the server's memory budget of {limit} bytes is in use; retry later")]
    Exhausted {
        /// The global budget in bytes.
        limit: u64,
    },
}

#[derive(Debug)]
struct Shared {
    total: u64,
    used: AtomicU64,
}

/// The global memory budget. Cheap to clone (shared counter).
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    shared: Arc<Shared>,
    per_transfer: u64,
}

impl MemoryBudget {
    /// A budget of `total` bytes, of which one transfer may hold at most
    /// `per_transfer` bytes (clamped to `total`).
    pub fn new(total: u64, per_transfer: u64) -> MemoryBudget {
        MemoryBudget {
            shared: Arc::new(Shared {
                total,
                used: AtomicU64::new(0),
            }),
            per_transfer: per_transfer.min(total),
        }
    }

    /// An empty reservation for one association, request or ingest.
    pub fn transfer(&self) -> Reservation {
        Reservation {
            shared: self.shared.clone(),
            held: 0,
            cap: self.per_transfer,
        }
    }

    /// Bytes reserved right now, across all transfers.
    pub fn in_use(&self) -> u64 {
        self.shared.used.load(Ordering::Acquire)
    }

    /// The global budget in bytes.
    pub fn total(&self) -> u64 {
        self.shared.total
    }

    /// The cap of one transfer in bytes.
    pub fn per_transfer(&self) -> u64 {
        self.per_transfer
    }
}

/// Bytes one transfer holds from a [`MemoryBudget`]; given back on drop or
/// by [`Reservation::release_all`].
#[derive(Debug)]
pub struct Reservation {
    shared: Arc<Shared>,
    held: u64,
    cap: u64,
}

impl Reservation {
    /// Reserves `n` more bytes.
    ///
    /// # Errors
    /// [`BudgetError::TransferLimit`] when this transfer would exceed its
    /// cap, [`BudgetError::Exhausted`] when the global budget has no room;
    /// nothing is reserved then.
    pub fn grow(&mut self, n: u64) -> Result<(), BudgetError> {
        let held = self.held.saturating_add(n);
        if held > self.cap {
            return Err(BudgetError::TransferLimit { limit: self.cap });
        }
        let total = self.shared.total;
        self.shared
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|u| *u <= total)
            })
            .map_err(|_| BudgetError::Exhausted { limit: total })?;
        self.held = held;
        Ok(())
    }

    /// Gives back `n` bytes (at most what is held).
    pub fn shrink(&mut self, n: u64) {
        let n = n.min(self.held);
        self.shared.used.fetch_sub(n, Ordering::AcqRel);
        self.held -= n;
    }

    /// Gives back everything held (the buffers it covered are gone).
    pub fn release_all(&mut self) {
        self.shrink(self.held);
    }

    /// Bytes held.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// The most this transfer may hold.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Appends `bytes` to `buf`, first reserving whatever capacity `buf`
    /// must gain (amortised doubling, but never past this transfer's cap),
    /// so the reservation always covers `buf`'s allocation. Call it only
    /// for buffers whose capacity this reservation already covers.
    ///
    /// # Errors
    /// As [`Reservation::grow`]; `buf` is unchanged then.
    pub fn extend(&mut self, buf: &mut Vec<u8>, bytes: &[u8]) -> Result<(), BudgetError> {
        self.extend_growing(buf, bytes, |have| have.saturating_mul(2))
    }

    /// Appends `bytes` to `buf`, growing its capacity to at least
    /// `grown(capacity)` (and `MIN_CHUNK`, at most this transfer's cap)
    /// when it must grow, reserving the difference first.
    fn extend_growing(
        &mut self,
        buf: &mut Vec<u8>,
        bytes: &[u8],
        grown: impl Fn(usize) -> usize,
    ) -> Result<(), BudgetError> {
        let need = buf.len().saturating_add(bytes.len());
        let have = buf.capacity();
        if need > have {
            // Room this buffer may grow to within the cap.
            let room = usize::try_from(self.cap.saturating_sub(self.held))
                .unwrap_or(usize::MAX)
                .saturating_add(have);
            let target = need.max(grown(have)).max(MIN_CHUNK).min(room).max(need);
            self.grow((target - have) as u64)?;
            // `Vec<u8>` allocates exactly what `reserve_exact` asks for.
            buf.reserve_exact(target - buf.len());
        }
        buf.extend_from_slice(bytes);
        Ok(())
    }
}

impl Reservation {
    /// [`Reservation::extend`] growing `buf` by an eighth at a time instead
    /// of doubling it, for a buffer that may approach this transfer's cap
    /// (a streamed STOW-RS part): its capacity stays within about 12 % of
    /// its length, so the share is not spent on room it will never use.
    ///
    /// # Errors
    /// As [`Reservation::grow`]; `buf` is unchanged then.
    pub fn extend_tight(&mut self, buf: &mut Vec<u8>, bytes: &[u8]) -> Result<(), BudgetError> {
        self.extend_growing(buf, bytes, |have| have.saturating_add(have / 8))
    }
}

/// Smallest capacity a budgeted buffer grows to (fewer reallocations for
/// small datasets).
const MIN_CHUNK: usize = 64 * 1024;

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_share_the_global_budget_and_give_it_back() {
        let budget = MemoryBudget::new(1000, 600);
        let mut a = budget.transfer();
        let mut b = budget.transfer();
        assert_eq!(a.grow(600), Ok(()));
        assert_eq!(a.grow(1), Err(BudgetError::TransferLimit { limit: 600 }));
        assert_eq!(b.grow(401), Err(BudgetError::Exhausted { limit: 1000 }));
        assert_eq!(budget.in_use(), 600);
        assert_eq!(b.grow(400), Ok(()));
        assert_eq!(budget.in_use(), 1000);
        drop(a);
        assert_eq!(budget.in_use(), 400);
        b.shrink(100);
        assert_eq!((b.held(), budget.in_use()), (300, 300));
        b.release_all();
        assert_eq!(budget.in_use(), 0);
    }

    #[test]
    fn extend_covers_the_buffer_capacity_and_stops_at_the_cap() {
        let budget = MemoryBudget::new(1 << 20, 300_000);
        let mut r = budget.transfer();
        let mut buf = Vec::new();
        let chunk = [7u8; 50_000];
        let mut appended = 0;
        for _ in 0..100 {
            match r.extend(&mut buf, &chunk) {
                Ok(()) => appended += chunk.len(),
                Err(e) => {
                    assert_eq!(e, BudgetError::TransferLimit { limit: 300_000 });
                    break;
                }
            }
            assert!(buf.capacity() as u64 <= r.held(), "capacity not covered");
        }
        assert_eq!(buf.len(), appended);
        assert_eq!(appended, 300_000);
        assert!(r.held() <= 300_000);
        assert_eq!(budget.in_use(), r.held());
    }

    #[test]
    fn many_threads_never_exceed_the_total() {
        let budget = MemoryBudget::new(10_000, 10_000);
        let peak = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let budget = budget.clone();
                let peak = peak.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let mut r = budget.transfer();
                        if r.grow(3_000).is_ok() {
                            peak.fetch_max(budget.in_use(), Ordering::AcqRel);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert!(peak.load(Ordering::Acquire) <= 10_000);
        assert!(peak.load(Ordering::Acquire) >= 3_000);
        assert_eq!(budget.in_use(), 0);
    }
}
