//! Wall-clock time since the Unix epoch, for the timestamps the APIs report (`created`,
//! `last_deployed_time_s`, registration and heartbeat times). Durations and deadlines use
//! `Instant`, never this.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// A day (days since 1970-01-01) as its UTC date, `YYYY-MM-DD` (proleptic Gregorian).
pub fn date_of_day(day: u64) -> String {
    // Counted from 0000-03-01, so a leap day ends its 400-, 100- and 4-year cycles.
    let z = day as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let of_era = z.rem_euclid(146_097);
    let year_of_era = (of_era - of_era / 1460 + of_era / 36_524 - of_era / 146_096) / 365;
    let day_of_year = of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let d = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let m = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    let y = year_of_era + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The day (days since 1970-01-01) of a UTC date written `YYYY-MM-DD`; `None` if it is not such a
/// date or lies before 1970.
pub fn day_of_date(date: &str) -> Option<u64> {
    let bytes = date.as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = bytes.get(range)?;
        part.iter().all(u8::is_ascii_digit).then(|| part.iter().fold(0, |n, b| n * 10 + i64::from(b - b'0')))
    };
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let (y, m, d) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if y < 1970 || d < 1 || d > days_in_month {
        return None;
    }
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let year_of_era = y.rem_euclid(400);
    let day_of_year = (153 * m + 2) / 5 + d - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    u64::try_from(era * 146_097 + day_of_era - 719_468).ok()
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
