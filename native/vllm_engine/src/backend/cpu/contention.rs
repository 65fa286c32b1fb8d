//! Whether the cores are ours: the gauge that lets the compute team run by default.
//!
//! The team (team.rs) keeps a helper spinning between the loops of a step. On free cores
//! that removes the fork-join cost; when other processes want the cores the spinning
//! helper is one more runnable thread, our threads get a smaller share and a helper
//! preempted mid-task holds up its loop (bench/RESULTS.md, C2 session 4: 25–40% slower
//! than rayon at load 4–5). The signal used here is the calling thread's own run-queue
//! delay (`/proc/thread-self/schedstat`, second field: nanoseconds spent runnable but
//! not running): near zero on free cores, a third or more of the time with one extra
//! busy process on 2 cores. Idle time (waiting for requests) counts as neither.
//!
//! Per calling thread: measured in windows of ≥ WINDOW; a window with more than
//! MAX_DELAY_SHARE of run-queue delay sends that thread's loops to rayon for `backoff`
//! (doubling while contention lasts, back to MIN_BACKOFF after a clean team window).

use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Shortest measuring window (a read of the schedstat file costs ~10 µs).
const WINDOW: Duration = Duration::from_millis(10);
/// Windows longer than this (the thread was idle in between) are dropped, not judged.
const MAX_WINDOW: Duration = Duration::from_millis(200);
/// Run-queue delay above this share of a window means another process competes.
const MAX_DELAY_SHARE: f64 = 0.10;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(3);

/// The decision state of one calling thread, fed with (time, cumulative run-queue delay).
#[derive(Debug)]
pub(crate) struct Gauge {
    /// The open window: its start, the delay total then, and whether its loops ran on the team.
    window: Option<(Instant, u64, bool)>,
    rayon_until: Option<Instant>,
    backoff: Duration,
    /// No schedstat on this system: rayon always (the behaviour before the gauge).
    blind: bool,
}

impl Gauge {
    pub(crate) fn new() -> Self {
        Gauge {
            window: None,
            rayon_until: None,
            backoff: MIN_BACKOFF,
            blind: false,
        }
    }

    fn on_team(&self, now: Instant) -> bool {
        !self.blind && self.rayon_until.is_none_or(|t| now >= t)
    }

    /// Whether a loop started at `now` may use the team; `delay_ns` is read only when a
    /// window closes or the mode changes.
    pub(crate) fn allows(&mut self, now: Instant, delay_ns: impl FnOnce() -> Option<u64>) -> bool {
        let team = self.on_team(now);
        let due = match self.window {
            None => true,
            Some((start, _, was_team)) => was_team != team || now.duration_since(start) >= WINDOW,
        };
        if due && !self.blind {
            match delay_ns() {
                Some(delay) => self.observe(now, delay),
                None => self.blind = true,
            }
        }
        self.on_team(now)
    }

    /// Closes the open window (judged only if its loops ran on the team and the thread was
    /// busy throughout) and opens the next.
    fn observe(&mut self, now: Instant, delay: u64) {
        if let Some((start, start_delay, true)) = self.window {
            let span = now.duration_since(start);
            if span <= MAX_WINDOW {
                let share = delay.saturating_sub(start_delay) as f64 / span.as_nanos().max(1) as f64;
                if share > MAX_DELAY_SHARE {
                    self.rayon_until = Some(now + self.backoff);
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                } else {
                    self.backoff = MIN_BACKOFF;
                }
            }
        }
        self.window = Some((now, delay, self.on_team(now)));
    }
}

/// This thread's cumulative run-queue delay in nanoseconds (Linux schedstat), if known.
fn run_queue_delay_ns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

thread_local! {
    static GAUGE: RefCell<Gauge> = RefCell::new(Gauge::new());
}

/// Whether the calling thread's next loop may use the team (see the module doc).
pub(crate) fn team_allowed() -> bool {
    GAUGE.with(|g| g.borrow_mut().allows(Instant::now(), run_queue_delay_ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Feeds windows of 20 ms with the given run-queue delay each; returns the decisions
    /// taken at each window's end.
    fn run(g: &mut Gauge, t0: Instant, from_ms: u64, delays_ms: &[u64], total: &mut u64) -> Vec<bool> {
        delays_ms
            .iter()
            .enumerate()
            .map(|(i, d)| {
                *total += d * MS;
                let now = t0 + Duration::from_millis(from_ms + 20 * (i as u64 + 1));
                g.allows(now, || Some(*total))
            })
            .collect()
    }

    #[test]
    fn contended_windows_send_loops_to_rayon_for_a_doubling_backoff_then_back() {
        let t0 = Instant::now();
        let mut g = Gauge::new();
        let mut total = 0;
        assert!(g.allows(t0, || Some(0)), "no window judged yet");
        // Free cores: 0–1 ms of delay per 20 ms window stays on the team.
        assert_eq!(run(&mut g, t0, 0, &[0, 1, 1], &mut total), [true, true, true]);
        // 8 ms of 20 waiting for a core: rayon for 100 ms.
        assert_eq!(run(&mut g, t0, 60, &[8], &mut total), [false]);
        let until = t0 + Duration::from_millis(80 + 100);
        assert!(!g.allows(until - Duration::from_millis(1), || Some(total)));
        // Contention seen while on rayon is not judged (it is rayon's, not the team's).
        total += 15 * MS;
        assert!(g.allows(until, || Some(total)), "back on the team after the backoff");
        // Still contended on the team: rayon again, now for 200 ms.
        total += 10 * MS;
        let now = until + Duration::from_millis(20);
        assert!(!g.allows(now, || Some(total)));
        assert!(!g.allows(now + Duration::from_millis(199), || Some(total)));
        let back = now + Duration::from_millis(200);
        assert!(g.allows(back, || Some(total)));
        // A clean team window resets the backoff: the next contention costs 100 ms again.
        total += MS;
        assert!(g.allows(back + Duration::from_millis(20), || Some(total)));
        total += 9 * MS;
        let hit = back + Duration::from_millis(40);
        assert!(!g.allows(hit, || Some(total)));
        assert!(g.allows(hit + Duration::from_millis(100), || Some(total)));
    }

    #[test]
    fn idle_gaps_are_not_judged_and_missing_schedstat_means_rayon() {
        let t0 = Instant::now();
        let mut g = Gauge::new();
        assert!(g.allows(t0, || Some(0)));
        // A 2 s gap (no requests) with a large delay total is dropped, not judged.
        assert!(g.allows(t0 + Duration::from_secs(2), || Some(900 * MS)));
        let mut none = Gauge::new();
        assert!(!none.allows(t0, || None));
        assert!(!none.allows(t0 + Duration::from_secs(10), || Some(0)));
    }

    #[test]
    fn this_kernels_schedstat_parses_when_it_has_one() {
        // The default (team when the cores are free) depends on it. A kernel built without
        // schedstats has no such file: the team then stays off (rayon), correct but slower.
        let path = "/proc/thread-self/schedstat";
        match std::fs::read_to_string(path) {
            Ok(text) => assert!(run_queue_delay_ns().is_some(), "{path} did not parse: {text:?}"),
            Err(e) => {
                eprintln!("{path}: {e}; the CPU team stays off on this machine");
                assert_eq!(run_queue_delay_ns(), None);
            }
        }
    }
}
