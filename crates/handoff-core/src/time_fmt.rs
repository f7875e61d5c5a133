//! Timestamps as the Segment spec writes them: ISO 8601 in UTC with millisecond precision.

use time::format_description::well_known::{Iso8601, Rfc3339};
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// Formats `t` as `2026-11-25T14:06:17.123Z`.
pub fn format_millis(t: OffsetDateTime) -> String {
    // `to_offset` panics when the result leaves the representable years; values from clients
    // are already UTC (see `parse_client`), so the fallback only guards against misuse.
    let utc = t.checked_to_offset(UtcOffset::UTC).unwrap_or(t);
    utc.format(format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    ))
    .unwrap_or_else(|_| utc.unix_timestamp().to_string())
}

/// Parses a client-supplied timestamp. Accepts RFC 3339 and the wider ISO 8601 forms SDKs send;
/// a timestamp without an offset is read as UTC (Python's naive `isoformat()` does that).
/// The result is in UTC; a time whose UTC equivalent leaves the years 1 to 9999 (such as
/// `9999-12-31T23:59:59-01:00`) is refused (converting it would panic).
pub fn parse_client(raw: &str) -> Option<OffsetDateTime> {
    let parsed = OffsetDateTime::parse(raw, &Rfc3339)
        .or_else(|_| OffsetDateTime::parse(raw, &Iso8601::DEFAULT))
        .ok()
        .or_else(|| {
            PrimitiveDateTime::parse(raw, &Iso8601::DEFAULT)
                .ok()
                .map(PrimitiveDateTime::assume_utc)
        })?;
    parsed.checked_to_offset(UtcOffset::UTC)
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The instant `ms` milliseconds after the Unix epoch (clamped to the representable range).
pub fn from_unix_millis(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        let t = parse_client("2026-11-25T14:06:17.123456+01:00").unwrap();
        assert_eq!(format_millis(t), "2026-11-25T13:06:17.123Z");
        assert!(parse_client("2026-11-25T14:06:17").is_some());
        assert!(parse_client("2026-11-25T14:06:17Z").is_some());
        assert!(parse_client("yesterday").is_none());
        assert!(parse_client("").is_none());
        assert!(
            parse_client("9999-12-31T23:59:59-01:00").is_none(),
            "its UTC time is past year 9999"
        );
        assert_eq!(
            parse_client("2026-11-25T23:30:00-01:00").unwrap().offset(),
            UtcOffset::UTC
        );
        assert_eq!(
            unix_millis(from_unix_millis(1_790_000_000_123)),
            1_790_000_000_123
        );
    }
}
