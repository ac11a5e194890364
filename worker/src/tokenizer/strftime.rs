//! A small `strftime` for chat templates' `strftime_now` (Llama 3.1 writes "26 Jul 2024").
//!
//! Contract: formats a Unix time (seconds, UTC; the worker has no time-zone database) with the C
//! specifiers `%Y %y %m %d %e %j %H %I %M %S %p %a %A %b %h %B %F %T %D %%`; an unknown specifier
//! is copied through unchanged, as glibc does.

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];

/// A calendar date and time of day in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u32, // 1..=12
    day: u32,   // 1..=31
    hour: u32,
    minute: u32,
    second: u32,
    weekday: usize, // 0 = Sunday
    yday: u32,      // 1..=366
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn civil_from_unix(secs: i64) -> Civil {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400) as u32;
    // 1970-01-01 was a Thursday.
    let weekday = (days + 4).rem_euclid(7) as usize;
    // Walk whole years, then months; dates far from 1970 are not needed by chat templates but
    // stay correct, just slower.
    let mut year = 1970i64;
    let mut d = days;
    loop {
        let len = if is_leap(year) { 366 } else { 365 };
        if d < 0 {
            year -= 1;
            d += if is_leap(year) { 366 } else { 365 };
        } else if d >= len {
            d -= len;
            year += 1;
        } else {
            break;
        }
    }
    let yday = d as u32 + 1;
    let month_lengths = [31, if is_leap(year) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 0;
    while d >= month_lengths[month] {
        d -= month_lengths[month];
        month += 1;
    }
    Civil {
        year,
        month: month as u32 + 1,
        day: d as u32 + 1,
        hour: rem / 3600,
        minute: rem / 60 % 60,
        second: rem % 60,
        weekday,
        yday,
    }
}

/// Formats `secs` since the Unix epoch (UTC) with a C `strftime` format.
pub(crate) fn format_utc(secs: i64, format: &str) -> String {
    let t = civil_from_unix(secs);
    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let hour12 = if t.hour.is_multiple_of(12) { 12 } else { t.hour % 12 };
        let piece = match spec {
            'Y' => t.year.to_string(),
            'y' => format!("{:02}", t.year.rem_euclid(100)),
            'm' => format!("{:02}", t.month),
            'd' => format!("{:02}", t.day),
            'e' => format!("{:2}", t.day),
            'j' => format!("{:03}", t.yday),
            'H' => format!("{:02}", t.hour),
            'I' => format!("{hour12:02}"),
            'M' => format!("{:02}", t.minute),
            'S' => format!("{:02}", t.second),
            'p' => (if t.hour < 12 { "AM" } else { "PM" }).to_string(),
            'a' => WEEKDAYS[t.weekday][..3].to_string(),
            'A' => WEEKDAYS[t.weekday].to_string(),
            'b' | 'h' => MONTHS[t.month as usize - 1][..3].to_string(),
            'B' => MONTHS[t.month as usize - 1].to_string(),
            'F' => format!("{}-{:02}-{:02}", t.year, t.month, t.day),
            'T' => format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second),
            'D' => format!("{:02}/{:02}/{:02}", t.month, t.day, t.year.rem_euclid(100)),
            '%' => "%".to_string(),
            other => format!("%{other}"),
        };
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_llama31_date_string() {
        // 2024-07-26 13:05:09 UTC, a Friday.
        assert_eq!(format_utc(1_721_999_109, "%d %b %Y"), "26 Jul 2024");
        assert_eq!(
            format_utc(1_721_999_109, "%A %B %e, %F %T %I%p %j"),
            "Friday July 26, 2024-07-26 13:05:09 01PM 208"
        );
    }

    #[test]
    fn handles_leap_days_and_the_epoch() {
        assert_eq!(format_utc(0, "%F %a"), "1970-01-01 Thu");
        assert_eq!(format_utc(951_782_400, "%F"), "2000-02-29");
        assert_eq!(format_utc(-1, "%F %T"), "1969-12-31 23:59:59");
    }

    #[test]
    fn unknown_specifiers_and_percent_are_kept() {
        assert_eq!(format_utc(0, "100%% %Q %"), "100% %Q %");
    }
}
