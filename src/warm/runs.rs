//! What each `[[warm]]` schedule did last and does next, for the status
//! page: kept in memory (a restart runs every schedule again at once).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::Warmed;
use crate::config::WarmSchedule;

/// One schedule's state.
#[derive(Debug, Clone)]
pub struct RunState {
    pub images: Vec<String>,
    pub every: Duration,
    /// Set while a run is under way.
    pub running_since: Option<SystemTime>,
    pub last: Option<LastRun>,
    pub next: Option<SystemTime>,
}

/// How the last run ended.
#[derive(Debug, Clone)]
pub struct LastRun {
    pub finished: SystemTime,
    pub took: Duration,
    /// What was read, or every image's error (`image: error; …`).
    pub result: Result<Warmed, String>,
}

/// Every schedule's state, in config order.
#[derive(Debug, Default)]
pub struct WarmRuns {
    states: Mutex<Vec<RunState>>,
}

impl WarmRuns {
    pub fn new(schedules: &[WarmSchedule]) -> Self {
        let states = schedules
            .iter()
            .map(|w| RunState {
                images: w.images.clone(),
                every: w.every,
                running_since: None,
                last: None,
                next: None,
            })
            .collect();
        WarmRuns {
            states: Mutex::new(states),
        }
    }

    fn with(&self, i: usize, f: impl FnOnce(&mut RunState)) {
        if let Some(s) = self.states.lock().unwrap_or_else(PoisonError::into_inner).get_mut(i) {
            f(s);
        }
    }

    pub fn started(&self, i: usize, at: SystemTime) {
        self.with(i, |s| {
            s.running_since = Some(at);
            s.next = None;
        });
    }

    pub fn finished(&self, i: usize, result: Result<Warmed, String>, at: SystemTime) {
        self.with(i, |s| {
            let took = s
                .running_since
                .take()
                .and_then(|start| at.duration_since(start).ok())
                .unwrap_or_default();
            s.last = Some(LastRun {
                finished: at,
                took,
                result,
            });
            s.next = Some(at + s.every);
        });
    }

    pub fn snapshot(&self) -> Vec<RunState> {
        self.states.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}
