//! Connection admission: per-source-address and total caps on the sockets a
//! listener holds, with eviction of the oldest *unproven* socket instead of
//! refusing a newcomer.
//!
//! A socket is *unproven* from its TCP accept until its peer has shown it
//! speaks the protocol (the HTTPS front end: the TLS handshake done and a
//! first request's headers read; the DIMSE front end: the TLS handshake and
//! the A-ASSOCIATE-RQ done). An idle TCP connection or a slowloris costs the
//! attacker nothing, so a cap that refuses newcomers once full lets one host
//! (or a few hundred addresses) lock everyone out, including legitimate
//! clients behind the same address. Here a newcomer is admitted by closing
//! the oldest unproven socket of its own address when that address is at its
//! cap, or of the address holding the most unproven sockets when the listener
//! is full; a newcomer is refused only when the sockets in its way have all
//! proven themselves. Timeouts (handshake, header read) close the rest.
//!
//! Home-made: no library offers per-address admission with eviction (tower's
//! limits are global and refuse). The bookkeeping is synchronous and knows no
//! network; the caller supplies how to close a socket (an [`Evict`] closure,
//! e.g. waking the connection's task), so both front ends share it.
//!
//! IPv6 addresses are grouped by /64 (one host usually owns a whole /64), as
//! the login throttle does.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, Mutex},
};

/// Closes an evicted socket (called once, outside the admission lock).
pub type Evict = Box<dyn FnOnce() + Send>;

/// The caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Sockets held at once (unproven and proven).
    pub max_total: usize,
    /// Sockets held at once from one source address (IPv6: one /64).
    pub max_per_address: usize,
    /// Unproven sockets held at once from one source address.
    pub max_unproven_per_address: usize,
}

/// Why a socket was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address already holds `max_per_address` proven sockets.
    AddressFull,
    /// The listener holds `max_total` sockets and all of them are proven.
    ListenerFull,
}

impl Refusal {
    /// A short reason for the log.
    pub fn describe(self) -> &'static str {
        match self {
            Refusal::AddressFull => "too many connections from this address",
            Refusal::ListenerFull => "too many connections",
        }
    }
}

/// The admission state of one listener. Share with `Arc`.
pub struct Admission {
    limits: AdmissionLimits,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next: u64,
    total: usize,
    by_addr: HashMap<IpAddr, Slot>,
}

#[derive(Default)]
struct Slot {
    /// Sockets of this address, unproven and proven.
    total: usize,
    /// Unproven sockets by admission order (oldest first).
    unproven: BTreeMap<u64, Evict>,
}

impl Admission {
    /// An empty table with these caps (each at least 1).
    pub fn new(limits: AdmissionLimits) -> Arc<Admission> {
        Arc::new(Admission {
            limits: AdmissionLimits {
                max_total: limits.max_total.max(1),
                max_per_address: limits.max_per_address.max(1),
                max_unproven_per_address: limits.max_unproven_per_address.max(1),
            },
            state: Mutex::new(State::default()),
        })
    }

    /// The caps in force.
    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    /// Admits a new socket from `peer` as unproven, evicting (through their
    /// [`Evict`]) the oldest unproven socket of the same address when that
    /// address is at a cap, and then the oldest unproven socket of the
    /// address holding the most when the listener is full. `evict` closes
    /// this socket should it be evicted in turn before [`Ticket::prove`].
    ///
    /// # Errors
    /// [`Refusal`] when only proven sockets stand in the way.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, evict: Evict) -> Result<Ticket, Refusal> {
        let key = group(peer);
        let mut evicted: Vec<Evict> = Vec::new();
        let outcome = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            self.make_room(&mut st, key, &mut evicted).map(|()| {
                let id = st.next;
                st.next += 1;
                st.total += 1;
                let slot = st.by_addr.entry(key).or_default();
                slot.total += 1;
                slot.unproven.insert(id, evict);
                Ticket {
                    admission: self.clone(),
                    key,
                    id,
                    proven: false,
                }
            })
        };
        // Closing happens outside the lock: an evictor may take other locks.
        for e in evicted {
            e();
        }
        outcome
    }

    /// Sockets held now: (total, unproven) for `peer`'s address.
    pub fn held_by(&self, peer: IpAddr) -> (usize, usize) {
        let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.by_addr
            .get(&group(peer))
            .map_or((0, 0), |s| (s.total, s.unproven.len()))
    }

    /// Sockets held now on the whole listener.
    pub fn held(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).total
    }

    fn make_room(
        &self,
        st: &mut State,
        key: IpAddr,
        evicted: &mut Vec<Evict>,
    ) -> Result<(), Refusal> {
        let l = self.limits;
        let (total, unproven) = st
            .by_addr
            .get(&key)
            .map_or((0, 0), |s| (s.total, s.unproven.len()));
        if total >= l.max_per_address || unproven >= l.max_unproven_per_address {
            match evict_oldest(st, key) {
                Some(e) => evicted.push(e),
                None => return Err(Refusal::AddressFull),
            }
        }
        if st.total >= l.max_total {
            // The address holding the most unproven sockets gives up its
            // oldest; ties go to the address whose oldest is oldest.
            let victim = st
                .by_addr
                .iter()
                .filter_map(|(k, s)| {
                    s.unproven
                        .keys()
                        .next()
                        .map(|first| (s.unproven.len(), std::cmp::Reverse(*first), *k))
                })
                .max()
                .map(|(_, _, k)| k);
            match victim.and_then(|k| evict_oldest(st, k)) {
                Some(e) => evicted.push(e),
                None => return Err(Refusal::ListenerFull),
            }
        }
        Ok(())
    }
}

/// Removes the oldest unproven socket of `key` from the counts and returns
/// how to close it.
fn evict_oldest(st: &mut State, key: IpAddr) -> Option<Evict> {
    let slot = st.by_addr.get_mut(&key)?;
    let (_, evict) = slot.unproven.pop_first()?;
    slot.total -= 1;
    st.total -= 1;
    if slot.total == 0 {
        st.by_addr.remove(&key);
    }
    Some(evict)
}

/// The address a socket is counted under: IPv4 as is (IPv4-mapped IPv6
/// included), IPv6 by its /64.
fn group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// One admitted socket; dropping it releases its place.
pub struct Ticket {
    admission: Arc<Admission>,
    key: IpAddr,
    id: u64,
    proven: bool,
}

impl Ticket {
    /// The peer has shown it speaks the protocol: the socket can no longer be
    /// evicted (it still counts against the caps until dropped). Returns
    /// false when it was evicted already (its connection should end).
    pub fn prove(&mut self) -> bool {
        if self.proven {
            return true;
        }
        let mut st = self
            .admission
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let still_here = st
            .by_addr
            .get_mut(&self.key)
            .and_then(|s| s.unproven.remove(&self.id))
            .is_some();
        self.proven = still_here;
        still_here
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self
            .admission
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(slot) = st.by_addr.get_mut(&self.key) else {
            return;
        };
        // An evicted socket was taken off the counts already.
        let counted = self.proven || slot.unproven.remove(&self.id).is_some();
        if !counted {
            return;
        }
        slot.total -= 1;
        let empty = slot.total == 0;
        st.total -= 1;
        if empty {
            st.by_addr.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn limits(total: usize, per: usize, unproven: usize) -> AdmissionLimits {
        AdmissionLimits {
            max_total: total,
            max_per_address: per,
            max_unproven_per_address: unproven,
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    /// An evictor that records its socket's number in `log`.
    fn marker(log: &Arc<Mutex<Vec<usize>>>, n: usize) -> Evict {
        let log = log.clone();
        Box::new(move || log.lock().expect("log").push(n))
    }

    #[test]
    fn own_address_flood_evicts_the_oldest_unproven_socket_not_the_newcomer() {
        let a = Admission::new(limits(1000, 64, 16));
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut flood = Vec::new();
        for n in 0..200 {
            flood.push(a.admit(ip("127.0.0.1"), marker(&log, n)).expect("admitted"));
        }
        // 184 evicted, oldest first; the address holds 16 unproven.
        assert_eq!(*log.lock().expect("log"), (0..184).collect::<Vec<_>>());
        assert_eq!(a.held_by(ip("127.0.0.1")), (16, 16));
        let mut client = a
            .admit(ip("127.0.0.1"), marker(&log, 999))
            .expect("client admitted");
        assert_eq!(log.lock().expect("log").last(), Some(&184));
        assert!(client.prove(), "the newcomer was not evicted");
        assert_eq!(a.held_by(ip("127.0.0.1")), (16, 15));
        drop(flood);
        assert_eq!(a.held_by(ip("127.0.0.1")), (1, 0));
        drop(client);
        assert_eq!(a.held(), 0);
    }

    #[test]
    fn many_address_flood_past_the_total_leaves_room_for_a_newcomer() {
        let a = Admission::new(limits(256, 64, 16));
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut flood = Vec::new();
        for n in 0..300 {
            let peer = ip(&format!("127.0.3.{}", n % 200 + 1));
            flood.push(a.admit(peer, marker(&log, n)).expect("admitted"));
        }
        assert_eq!(a.held(), 256);
        assert_eq!(log.lock().expect("log").len(), 44);
        let mut client = a
            .admit(ip("127.0.0.1"), marker(&log, 999))
            .expect("client admitted");
        assert!(client.prove());
        assert_eq!(a.held(), 256);
        assert!(!log.lock().expect("log").contains(&999));
    }

    #[test]
    fn proven_sockets_are_never_evicted_and_a_full_address_refuses() {
        let a = Admission::new(limits(100, 3, 2));
        let evicted = Arc::new(AtomicUsize::new(0));
        let mut held = Vec::new();
        for _ in 0..3 {
            let e = evicted.clone();
            let mut t = a
                .admit(
                    ip("10.0.0.1"),
                    Box::new(move || {
                        e.fetch_add(1, Ordering::SeqCst);
                    }),
                )
                .expect("admitted");
            assert!(t.prove());
            held.push(t);
        }
        let r = a.admit(ip("10.0.0.1"), Box::new(|| {}));
        assert_eq!(r.err(), Some(Refusal::AddressFull));
        assert_eq!(evicted.load(Ordering::SeqCst), 0);
        // another address is unaffected
        assert!(a.admit(ip("10.0.0.2"), Box::new(|| {})).is_ok());
    }

    #[test]
    fn a_full_listener_of_proven_sockets_refuses() {
        let a = Admission::new(limits(2, 2, 2));
        let mut t1 = a.admit(ip("10.0.0.1"), Box::new(|| {})).expect("1");
        let mut t2 = a.admit(ip("10.0.0.2"), Box::new(|| {})).expect("2");
        assert!(t1.prove() && t2.prove());
        let r = a.admit(ip("10.0.0.3"), Box::new(|| {}));
        assert_eq!(r.err(), Some(Refusal::ListenerFull));
        drop(t1);
        assert!(a.admit(ip("10.0.0.3"), Box::new(|| {})).is_ok());
    }

    #[test]
    fn an_evicted_ticket_cannot_prove_and_releases_nothing_twice() {
        let a = Admission::new(limits(10, 10, 1));
        let mut first = a.admit(ip("10.0.0.1"), Box::new(|| {})).expect("1");
        let second = a.admit(ip("10.0.0.1"), Box::new(|| {})).expect("2");
        assert!(!first.prove());
        drop(first);
        assert_eq!(a.held_by(ip("10.0.0.1")), (1, 1));
        drop(second);
        assert_eq!(a.held(), 0);
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let a = Admission::new(limits(10, 10, 1));
        let log = Arc::new(Mutex::new(Vec::new()));
        let _t1 = a.admit(ip("2001:db8::1"), marker(&log, 1)).expect("1");
        let _t2 = a.admit(ip("2001:db8::2"), marker(&log, 2)).expect("2");
        assert_eq!(*log.lock().expect("log"), vec![1]);
        let _t3 = a.admit(ip("2001:db8:0:1::1"), marker(&log, 3)).expect("3");
        assert_eq!(*log.lock().expect("log"), vec![1]);
    }
}
