//! What the filter has learnt about the RLS v3 server it talks to, and what that server's
//! answers may be used for.
//!
//! laneguard-service decides all or nothing (a refused request is charged nowhere), reports
//! `duration_until_reset` as "the bucket is full again in", and grants leases: an admitted
//! request that asked for one (`x-laneguard-lease`) gets a `quota` whenever every bucket has
//! room for one more request after it. A standard RLS server (envoyproxy/ratelimit and the
//! like) counts fixed windows: `duration_until_reset` is the time left in the current window
//! whatever the level, every descriptor is charged on its own (also those of a refused
//! request), and it never sends a `quota`.
//!
//! So a server is [`Peer::Leasing`] once it sent a `quota`, and [`Peer::Plain`] once it
//! admitted a request that asked for a lease, left room in every bucket, and sent none
//! (laneguard-service would have granted at least one unit). Until then it is
//! [`Peer::Unknown`], and its answers are used only in ways that are safe for both kinds.

/// The kind of RLS server, as learnt from its answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Peer {
    #[default]
    Unknown,
    /// Sends leases: laneguard-service (or a server that speaks its extension).
    Leasing,
    /// Never sends a lease: a standard RLS server.
    Plain,
}

/// What one answer showed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answer {
    /// The request asked for a lease (the filter sent a lease size above 0).
    pub asked_lease: bool,
    pub admitted: bool,
    /// Some status carried a `quota`.
    pub quota: bool,
    /// Every limited status reported room for at least one more request.
    pub room_left: bool,
}

impl Peer {
    /// Learn from one answer. A `quota` makes the server leasing for good; a plain server
    /// is recognised from an admitted lease request that left room and got none.
    pub fn learn(&mut self, a: Answer) {
        if a.quota {
            *self = Peer::Leasing;
        } else if *self == Peer::Unknown && a.asked_lease && a.admitted && a.room_left {
            *self = Peer::Plain;
        }
    }

    /// Whether `duration_until_reset` says when the bucket is full again, so the local
    /// mirror may align with it (and hold local refusals while it is empty). Only for a
    /// leasing server: a fixed window's reset is the time left in the window, even when the
    /// bucket is barely used, and would make the filter refuse locally for most of it.
    pub fn reset_is_refill(self) -> bool {
        self == Peer::Leasing
    }

    /// Whether the local mirror may align with a bucket's `duration_until_reset`: always
    /// for a bucket the server refused (for either kind it has no room before then: a fixed
    /// window until it ends), otherwise only when that is when it is full again.
    pub fn syncs(self, refused: bool) -> bool {
        refused || self.reset_is_refill()
    }

    /// Whether a refused request was charged on the buckets that had room (a standard
    /// server charges each descriptor on its own). Then a borrowing retry sends only the
    /// borrowed pool: the other buckets were paid on the refusal already.
    pub fn charges_refusals(self) -> bool {
        self == Peer::Plain
    }

    /// Whether the server's `duration_until_reset` on a refused bucket is when it has room
    /// again (a fixed window's end), to use for `Retry-After` and queue waits.
    pub fn reset_is_retry(self) -> bool {
        self == Peer::Plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE_ASKED_ROOM: Answer = Answer {
        asked_lease: true,
        admitted: true,
        quota: false,
        room_left: true,
    };

    #[test]
    fn a_quota_means_leasing_and_an_ungranted_roomy_admission_means_plain() {
        let mut p = Peer::default();
        assert!(!p.reset_is_refill() && !p.charges_refusals());
        // No information: refused, no lease asked, or no room left for a grant.
        for a in [
            Answer {
                admitted: false,
                ..LEASE_ASKED_ROOM
            },
            Answer {
                asked_lease: false,
                ..LEASE_ASKED_ROOM
            },
            Answer {
                room_left: false,
                ..LEASE_ASKED_ROOM
            },
        ] {
            p.learn(a);
            assert_eq!(p, Peer::Unknown, "{a:?}");
        }
        p.learn(LEASE_ASKED_ROOM);
        assert_eq!(p, Peer::Plain);
        assert!(p.charges_refusals() && p.reset_is_retry() && !p.reset_is_refill());
        assert!(
            p.syncs(true) && !p.syncs(false),
            "a refused bucket is empty for both kinds"
        );

        let mut q = Peer::default();
        q.learn(Answer {
            quota: true,
            ..LEASE_ASKED_ROOM
        });
        assert_eq!(q, Peer::Leasing);
        // A leasing server that once granted nothing is still leasing.
        q.learn(LEASE_ASKED_ROOM);
        assert_eq!(q, Peer::Leasing);
        assert!(q.reset_is_refill() && !q.charges_refusals());
    }
}
