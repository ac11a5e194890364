//! Wall-clock time since the Unix epoch, for the timestamps the APIs report (`created`,
//! `last_deployed_time_s`, registration and heartbeat times). Durations and deadlines use
//! `Instant`, never this.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{Days, NaiveDate};

/// Time since the Unix epoch (zero if the clock is set before it).
pub fn since_epoch() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Whole Unix seconds now.
pub fn unix_s() -> u64 {
    since_epoch().as_secs()
}

/// Unix milliseconds now.
pub fn unix_ms() -> u64 {
    since_epoch().as_millis() as u64
}

/// Seconds in a day (UTC days have no leap seconds in Unix time).
pub const DAY_S: u64 = 86_400;

/// The UTC day now, as days since 1970-01-01.
pub fn utc_day() -> u64 {
    unix_s() / DAY_S
}

/// 1970-01-01, day 0.
fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("1970-01-01 is a date")
}

/// A day (days since 1970-01-01) as its UTC date, `YYYY-MM-DD` (proleptic Gregorian).
pub fn date_of_day(day: u64) -> String {
    match epoch().checked_add_days(Days::new(day)) {
        Some(date) => date.format("%Y-%m-%d").to_string(),
        // Past chrono's last year (262,143): no date a count is ever kept for.
        None => format!("day {day}"),
    }
}

/// The day (days since 1970-01-01) of a UTC date written `YYYY-MM-DD`; `None` if it is not such a
/// date or lies before 1970.
pub fn day_of_date(date: &str) -> Option<u64> {
    // Exactly four, two and two ASCII digits: chrono alone also takes "2026-1-01" or "+026".
    let shape = date.len() == 10
        && date.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    let parsed = NaiveDate::parse_from_str(date, "%Y-%m-%d").ok().filter(|_| shape)?;
    u64::try_from(parsed.signed_duration_since(epoch()).num_days()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_days_agree_both_ways() {
        let known = [
            (0, "1970-01-01"),
            (59, "1970-03-01"),
            (10_957, "2000-01-01"),
            (11_016, "2000-02-29"),
            (19_722, "2023-12-31"),
            (20_513, "2026-03-01"),
        ];
        for (day, date) in known {
            assert_eq!(date_of_day(day), date);
            assert_eq!(day_of_date(date), Some(day), "{date}");
        }
        for day in (0..200_000).step_by(7) {
            assert_eq!(day_of_date(&date_of_day(day)), Some(day));
        }
    }

    #[test]
    fn what_is_not_a_date_is_refused() {
        for bad in [
            "",
            "2026-1-01",
            "2026-13-01",
            "2026-02-29",
            "1900-02-29",
            "2026-04-31",
            "1969-12-31",
            "2026/01/01",
            "２０２６-01-01",
            "+026-01-01",
            "2026-01-01T00",
        ] {
            assert_eq!(day_of_date(bad), None, "{bad}");
        }
        assert_eq!(day_of_date("2024-02-29"), Some(19_782));
    }
}
