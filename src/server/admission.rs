//! Admission: whether a new connection may join the connection table, and
//! which open connection makes room for it when the table is (nearly) full.
//!
//! The decision is pure (counts and what each connection is doing in, a
//! verdict out) so that the rules are tested here without sockets; the
//! table in `mod.rs` gathers the inputs and carries the verdict out.
//!
//! The rules, and why:
//!
//! - Below `max_connections - max_connections_per_client` anyone may open
//!   as many connections as they like. One address is not one client: a
//!   fleet of CI runners behind one NAT gateway arrives as one address, and
//!   a hard per-address wall made such a fleet's own new connections push
//!   each other out while the server was otherwise idle.
//! - In the last share of the table an address that already holds a share
//!   (`max_connections_per_client`) may open another only by giving up one
//!   of its own idle connections, so that share stays free for the others.
//! - At `max_connections` a new connection replaces an idle one of the
//!   heaviest address that holds more than the newcomer's (or of the
//!   newcomer's own): the heavy give way first, and nobody pushes out a
//!   lighter client.
//! - Only idle connections are ever closed to make room. Idle means a
//!   connection that finished a request and has none in flight, or a socket
//!   that has not sent a single byte. A connection that has sent something
//!   and not yet got its answer (mid-handshake, mid-request) is never idle:
//!   closing it would reset a real client's request. Its own deadlines
//!   (handshake, first request, idle) bound how long it can be held.
//! - When nothing may be closed the newcomer is refused, and answered where
//!   the protocol allows (a 503 with `Retry-After`), never silently reset.
//!
//! Silent sockets are what a flood of hostile connections looks like, so
//! they go first; but a real client's ClientHello may not have been read
//! yet in the first instant after accept, so a silent socket younger than
//! [`SILENT_GRACE`] ranks after the idle connections, and makes room only
//! when the table is full (lest a flood lock others out). In the last share
//! an address competes only with itself, so its newcomer is refused (and
//! answered) rather than reset one of its own that may be about to speak.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// How long after accept a socket that has sent nothing still counts as a
/// client that may be about to speak (its first bytes not read yet), rather
/// than as a silent socket.
pub(super) const SILENT_GRACE: Duration = Duration::from_secs(1);

/// What an open connection is doing, as far as making room is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Activity {
    /// Not one byte received since accept.
    Silent { since: Instant },
    /// Served a request, none in flight, nothing new received.
    Idle { since: Instant },
    /// In its handshake, reading a request head, or a request in flight.
    Busy,
}

/// An open connection that might make room.
#[derive(Clone, Copy, Debug)]
pub(super) struct Candidate {
    pub id: u64,
    pub ip: IpAddr,
    pub activity: Activity,
}

/// The caps, from `[limits]`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Policy {
    pub max_connections: usize,
    /// The share of the table an address holds before the last share of
    /// the table is closed to it.
    pub share: usize,
}

/// What the table is to do with a new connection.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decision {
    Admit,
    /// Admit it and close this connection to make room.
    Replace(u64),
    Refuse(Refused),
}

/// Why a new connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("connection limit reached and no connection it may replace is idle")]
    Full,
    #[error("connection table nearly full, this client holds its share and none of its connections is idle")]
    Share,
}

/// How full the table is, for a newcomer holding `own` connections already.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pressure {
    /// Room for anyone: admit without looking at the connections.
    None,
    /// Nearly full and this client holds its share: its own idle go.
    Share,
    /// Full: the heaviest client's idle go.
    Full,
}

impl Policy {
    /// Cheap (no walk over the table), so that admission under no pressure
    /// costs a lookup and an insert.
    pub(super) fn pressure(&self, total: usize, own: usize) -> Pressure {
        if total >= self.max_connections {
            Pressure::Full
        } else if own >= self.share && total >= self.max_connections.saturating_sub(self.share) {
            Pressure::Share
        } else {
            Pressure::None
        }
    }
}

/// Under `pressure` (not [`Pressure::None`]), picks the connection that
/// makes room for a newcomer from `ip`, or says why there is none.
/// `per_client` counts every open connection by address.
pub(super) fn decide(
    pressure: Pressure,
    ip: IpAddr,
    per_client: &HashMap<IpAddr, usize>,
    now: Instant,
    candidates: impl IntoIterator<Item = Candidate>,
) -> Decision {
    let own = per_client.get(&ip).copied().unwrap_or(0);
    let count = |a: &IpAddr| per_client.get(a).copied().unwrap_or(0);
    let eligible = |c: &Candidate| match pressure {
        Pressure::None => false,
        Pressure::Share => c.ip == ip,
        Pressure::Full => c.ip == ip || count(&c.ip) > own,
    };
    // Heaviest address first; on a tie the newcomer's own; then by how
    // safely the connection can go (see `class`), the longest-quiet first.
    let victim = candidates
        .into_iter()
        .filter(eligible)
        .filter_map(|c| {
            let (class, since) = class(c.activity, now)?;
            if class == 2 && pressure != Pressure::Full {
                return None;
            }
            Some(((std::cmp::Reverse(count(&c.ip)), c.ip != ip, class, since), c.id))
        })
        .min();
    match (victim, pressure) {
        (Some((_, id)), _) => Decision::Replace(id),
        (None, Pressure::None) => Decision::Admit,
        (None, Pressure::Share) => Decision::Refuse(Refused::Share),
        (None, Pressure::Full) => Decision::Refuse(Refused::Full),
    }
}

/// The order in which one address's connections make room: silent sockets
/// past [`SILENT_GRACE`] (0), idle connections (1), silent sockets that may
/// be about to speak (2, only when the table is full); `None` for one that
/// must not be closed.
fn class(activity: Activity, now: Instant) -> Option<(u8, Instant)> {
    match activity {
        Activity::Silent { since } if now.saturating_duration_since(since) >= SILENT_GRACE => Some((0, since)),
        Activity::Idle { since } => Some((1, since)),
        Activity::Silent { since } => Some((2, since)),
        Activity::Busy => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    struct Table {
        now: Instant,
        conns: Vec<Candidate>,
    }

    impl Table {
        fn new() -> Table {
            Table {
                now: Instant::now() + Duration::from_secs(100),
                conns: Vec::new(),
            }
        }
        /// Adds `n` connections from `ip`, each `age_s` seconds into `activity`.
        fn add(&mut self, n: usize, from: IpAddr, activity: fn(Instant) -> Activity, age_s: f64) -> &mut Self {
            for _ in 0..n {
                let id = self.conns.len() as u64;
                let since = self.now - Duration::from_secs_f64(age_s);
                self.conns.push(Candidate {
                    id,
                    ip: from,
                    activity: activity(since),
                });
            }
            self
        }
        fn per_client(&self) -> HashMap<IpAddr, usize> {
            let mut m = HashMap::new();
            for c in &self.conns {
                *m.entry(c.ip).or_insert(0) += 1;
            }
            m
        }
        fn decide(&self, policy: Policy, from: IpAddr) -> Decision {
            let per_client = self.per_client();
            let own = per_client.get(&from).copied().unwrap_or(0);
            match policy.pressure(self.conns.len(), own) {
                Pressure::None => Decision::Admit,
                p => decide(p, from, &per_client, self.now, self.conns.iter().copied()),
            }
        }
        fn ip_of(&self, d: &Decision) -> IpAddr {
            match d {
                Decision::Replace(id) => self.conns[*id as usize].ip,
                other => panic!("expected a replacement, got {other:?}"),
            }
        }
        fn activity_of(&self, d: &Decision) -> Activity {
            match d {
                Decision::Replace(id) => self.conns[*id as usize].activity,
                other => panic!("expected a replacement, got {other:?}"),
            }
        }
    }

    fn silent(since: Instant) -> Activity {
        Activity::Silent { since }
    }
    fn idle(since: Instant) -> Activity {
        Activity::Idle { since }
    }
    fn busy(_: Instant) -> Activity {
        Activity::Busy
    }

    const POLICY: Policy = Policy {
        max_connections: 100,
        share: 10,
    };

    #[test]
    fn one_address_may_hold_most_of_the_table() {
        // A NAT'd fleet: 89 connections from one address, far over its
        // share, while the table has room; its new connections close nothing.
        let mut t = Table::new();
        t.add(89, ip(1), idle, 5.0);
        assert_eq!(t.decide(POLICY, ip(1)), Decision::Admit);
        assert_eq!(t.decide(POLICY, ip(2)), Decision::Admit);
    }

    #[test]
    fn in_the_last_share_a_heavy_address_replaces_its_own_idle() {
        let mut t = Table::new();
        t.add(80, ip(1), busy, 1.0)
            .add(5, ip(1), idle, 3.0)
            .add(5, ip(2), idle, 30.0);
        let d = t.decide(POLICY, ip(1));
        assert_eq!(t.ip_of(&d), ip(1), "its own, not ip(2)'s older idle ones");
        // A light address still gets in without closing anything.
        assert_eq!(t.decide(POLICY, ip(3)), Decision::Admit);
        assert_eq!(t.decide(POLICY, ip(2)), Decision::Admit);
    }

    #[test]
    fn in_the_last_share_a_heavy_address_with_nothing_idle_is_refused() {
        let mut t = Table::new();
        t.add(85, ip(1), busy, 1.0).add(5, ip(2), idle, 30.0);
        assert_eq!(t.decide(POLICY, ip(1)), Decision::Refuse(Refused::Share));
    }

    #[test]
    fn when_full_the_heaviest_address_gives_way() {
        let mut t = Table::new();
        t.add(10, ip(2), idle, 50.0)
            .add(60, ip(1), idle, 2.0)
            .add(30, ip(3), idle, 40.0);
        let d = t.decide(POLICY, ip(4));
        assert_eq!(t.ip_of(&d), ip(1), "heaviest first, however recently used");
    }

    #[test]
    fn when_full_the_next_heaviest_gives_way_if_the_heaviest_is_all_busy() {
        let mut t = Table::new();
        t.add(60, ip(1), busy, 2.0)
            .add(30, ip(3), idle, 4.0)
            .add(10, ip(2), idle, 50.0);
        let d = t.decide(POLICY, ip(4));
        assert_eq!(t.ip_of(&d), ip(3));
    }

    #[test]
    fn nobody_pushes_out_a_lighter_client() {
        // The newcomer's address holds 60 (all busy); the others hold fewer.
        let mut t = Table::new();
        t.add(60, ip(1), busy, 2.0)
            .add(30, ip(3), idle, 4.0)
            .add(10, ip(2), idle, 50.0);
        assert_eq!(t.decide(POLICY, ip(1)), Decision::Refuse(Refused::Full));
        // With one idle connection of its own, that one goes.
        let mut t = Table::new();
        t.add(59, ip(1), busy, 2.0).add(1, ip(1), idle, 1.0);
        t.add(30, ip(3), idle, 4.0).add(10, ip(2), idle, 50.0);
        assert_eq!(t.decide(POLICY, ip(1)), Decision::Replace(59));
    }

    #[test]
    fn mid_handshake_and_mid_request_are_never_closed() {
        let mut t = Table::new();
        t.add(100, ip(1), busy, 9.0);
        assert_eq!(t.decide(POLICY, ip(2)), Decision::Refuse(Refused::Full));
        assert_eq!(t.decide(POLICY, ip(1)), Decision::Refuse(Refused::Full));
    }

    #[test]
    fn silent_sockets_go_before_idle_ones_and_young_silent_ones_last() {
        let mut t = Table::new();
        t.add(40, ip(1), idle, 30.0)
            .add(40, ip(1), silent, 0.2)
            .add(20, ip(1), silent, 2.0);
        let d = t.decide(POLICY, ip(2));
        assert_eq!(t.activity_of(&d), silent(t.now - Duration::from_secs(2)));
        // No old silent ones: the idle go, not the maybe-about-to-speak.
        let mut t = Table::new();
        t.add(40, ip(1), idle, 30.0)
            .add(40, ip(1), silent, 0.2)
            .add(20, ip(1), busy, 2.0);
        let d = t.decide(POLICY, ip(2));
        assert_eq!(t.activity_of(&d), idle(t.now - Duration::from_secs(30)));
        // Only young silent sockets besides busy ones: they still go, the
        // oldest first, rather than lock the newcomer out.
        let mut t = Table::new();
        t.add(40, ip(1), silent, 0.2)
            .add(1, ip(1), silent, 0.5)
            .add(59, ip(1), busy, 2.0);
        assert_eq!(t.decide(POLICY, ip(2)), Decision::Replace(40));
    }

    #[test]
    fn in_the_last_share_a_young_silent_socket_is_not_replaced() {
        // It may be the address's own client about to speak: refusing the
        // newcomer (with an answer) beats resetting that one.
        let mut t = Table::new();
        t.add(85, ip(1), busy, 1.0).add(5, ip(1), silent, 0.3);
        assert_eq!(t.decide(POLICY, ip(1)), Decision::Refuse(Refused::Share));
        t.add(1, ip(1), silent, 1.5);
        assert_eq!(t.decide(POLICY, ip(1)), Decision::Replace(90));
    }

    #[test]
    fn the_longest_idle_of_the_chosen_address_goes() {
        let mut t = Table::new();
        t.add(50, ip(1), idle, 3.0)
            .add(1, ip(1), idle, 20.0)
            .add(49, ip(1), idle, 5.0);
        assert_eq!(t.decide(POLICY, ip(2)), Decision::Replace(50));
    }

    #[test]
    fn a_flood_from_one_address_leaves_room_for_everyone_else() {
        // 4,200 silent sockets from one address against the default caps:
        // the flood replaces its own in the last share, so another address
        // is admitted without closing anything.
        let policy = Policy {
            max_connections: 4096,
            share: 256,
        };
        let mut t = Table::new();
        t.add(4096 - 256, ip(1), silent, 3.0);
        assert_eq!(t.ip_of(&t.decide(policy, ip(1))), ip(1));
        assert_eq!(t.decide(policy, ip(2)), Decision::Admit);
    }
}
