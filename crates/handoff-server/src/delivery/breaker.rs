//! The circuit breaker of one destination: closed; open after `threshold` consecutive failures
//! (or a failed probe), sending nothing for `cooldown`; then half-open, letting one probe
//! request through; closed again on the first success. Time is read from tokio's clock, so its
//! tests run on paused time.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen,
}

/// What may be sent now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// As much as there is.
    All,
    /// One request, to see whether the vendor is back.
    Probe,
    /// Nothing for this long.
    Wait(Duration),
}

#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    failures: u32,
    threshold: u32,
    cooldown: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Breaker {
            state: State::Closed,
            failures: 0,
            threshold: threshold.max(1),
            cooldown,
        }
    }

    /// What may be sent at `now`; an open breaker whose cooldown has passed turns half-open.
    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed => Admit::All,
            State::HalfOpen => Admit::Probe,
            State::Open { until } if now < until => Admit::Wait(until - now),
            State::Open { .. } => {
                self.state = State::HalfOpen;
                Admit::Probe
            }
        }
    }

    /// The vendor accepted a request.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.state = State::Closed;
    }

    /// The vendor failed a request at `now` (unavailable, throttling, timeout); `true` when
    /// this opened the breaker.
    pub fn failed(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        if self.state == State::HalfOpen || self.failures >= self.threshold {
            self.state = State::Open {
                until: now + self.cooldown,
            };
            return true;
        }
        false
    }

    /// Consecutive failures so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// As operators see it (`destinations status`, the admin API).
    pub fn name(&self) -> &'static str {
        match self.state {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen => "half_open",
        }
    }

    /// The `handoff_delivery_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(&self) -> i64 {
        match self.state {
            State::Closed => 0,
            State::HalfOpen => 1,
            State::Open { .. } => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COOLDOWN: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_probes_after_the_cooldown() {
        let mut b = Breaker::new(3, COOLDOWN);
        assert_eq!(b.admit(Instant::now()), Admit::All);
        assert!(!b.failed(Instant::now()));
        assert!(!b.failed(Instant::now()));
        assert_eq!(b.name(), "closed");
        assert!(b.failed(Instant::now()), "the third failure opens it");
        assert_eq!((b.name(), b.gauge()), ("open", 2));
        assert_eq!(b.admit(Instant::now()), Admit::Wait(COOLDOWN));

        tokio::time::advance(COOLDOWN - Duration::from_secs(1)).await;
        assert_eq!(b.admit(Instant::now()), Admit::Wait(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.admit(Instant::now()), Admit::Probe);
        assert_eq!((b.name(), b.gauge()), ("half_open", 1));
        assert_eq!(
            b.admit(Instant::now()),
            Admit::Probe,
            "until the probe answers"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again_for_a_whole_cooldown() {
        let mut b = Breaker::new(1, COOLDOWN);
        assert!(b.failed(Instant::now()));
        tokio::time::advance(COOLDOWN).await;
        assert_eq!(b.admit(Instant::now()), Admit::Probe);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(b.failed(Instant::now()), "one failed probe is enough");
        assert_eq!(b.admit(Instant::now()), Admit::Wait(COOLDOWN));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_closes_it_and_forgets_the_failures() {
        let mut b = Breaker::new(3, COOLDOWN);
        b.failed(Instant::now());
        b.failed(Instant::now());
        b.succeeded();
        assert_eq!(b.failures(), 0);
        assert!(!b.failed(Instant::now()), "counting starts over");
        assert!(!b.failed(Instant::now()));
        assert!(b.failed(Instant::now()));
        tokio::time::advance(COOLDOWN).await;
        assert_eq!(b.admit(Instant::now()), Admit::Probe);
        b.succeeded();
        assert_eq!((b.admit(Instant::now()), b.name()), (Admit::All, "closed"));
    }

    #[test]
    fn a_threshold_of_zero_means_one() {
        let mut b = Breaker::new(0, COOLDOWN);
        assert!(b.failed(Instant::now()));
    }
}
