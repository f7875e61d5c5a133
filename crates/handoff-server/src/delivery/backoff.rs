//! Retry delays: exponential backoff with full jitter.

use std::time::Duration;

use handoff_core::policy::model::DeliverySettings;

/// Exponential backoff with full jitter: a random delay up to `base * 2^attempts`, capped.
pub fn backoff(settings: &DeliverySettings, attempts: u32) -> Duration {
    let cap = settings
        .retry_base
        .saturating_mul(1u32 << attempts.min(20))
        .min(settings.retry_max);
    let ms = cap.as_millis().max(1) as u64;
    Duration::from_millis(rand::random_range(0..=ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_full_jitter_and_a_cap() {
        let s = DeliverySettings {
            retry_base: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            ..DeliverySettings::default()
        };
        for attempts in 0..30 {
            let cap = (100u64 << attempts.min(20)).min(2000);
            for _ in 0..20 {
                assert!(backoff(&s, attempts).as_millis() as u64 <= cap);
            }
        }
        let spread: std::collections::HashSet<u128> =
            (0..50).map(|_| backoff(&s, 4).as_millis()).collect();
        assert!(spread.len() > 10, "jittered");
    }
}
