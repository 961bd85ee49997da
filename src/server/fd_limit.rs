//! Every client connection is a file descriptor, so `limits.max_connections`
//! means nothing above the process's `RLIMIT_NOFILE`: past it, accept fails
//! (EMFILE) and clients see resets instead of the fair share. systemd and
//! most shells start services with a soft limit of 1,024 and a hard limit
//! far above; the soft limit is raised to the hard one at start, as nginx's
//! `worker_rlimit_nofile` and Go's runtime do, and a limit still short of
//! what the connection table needs is a warning naming the fix.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors regmirror holds beside client connections: listeners, the
/// store's files and database, upstream connections, the log.
const OWN_DESCRIPTORS: u64 = 256;

/// What the table needs: a descriptor per connection, plus regmirror's own.
pub fn needed(max_connections: usize) -> u64 {
    max_connections as u64 + OWN_DESCRIPTORS
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft
/// limit now in force (`None`: unlimited).
pub fn raise() -> Option<u64> {
    let now = getrlimit(Resource::Nofile);
    if now.current != now.maximum {
        let raised = Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %e, "could not raise RLIMIT_NOFILE to its hard limit");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// Raises the limit and warns when it stays below what `max_connections`
/// needs.
pub fn ensure(max_connections: usize) {
    let needed = needed(max_connections);
    match raise() {
        Some(limit) if limit < needed => tracing::warn!(
            limit,
            needed,
            "RLIMIT_NOFILE ({limit}) is below what limits.max_connections ({max_connections}) needs ({needed}): \
             connections past it are reset, not answered; raise LimitNOFILE (systemd) or `ulimit -n`, or lower limits.max_connections"
        ),
        limit => tracing::debug!(?limit, needed, "RLIMIT_NOFILE"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let before = getrlimit(Resource::Nofile);
        let Some(hard) = before.maximum else { return };
        let lowered = Rlimit {
            current: Some(hard.min(512)),
            maximum: before.maximum,
        };
        setrlimit(Resource::Nofile, lowered).expect("lower the soft limit");
        assert_eq!(raise(), Some(hard));
        setrlimit(Resource::Nofile, before).expect("restore the limit");
    }

    #[test]
    fn the_table_needs_a_descriptor_per_connection_and_some() {
        assert_eq!(needed(4096), 4096 + OWN_DESCRIPTORS);
    }
}
