//! Points in time as the audit commands take and show them: RFC 3339 timestamps or epoch
//! milliseconds in, UTC timestamps out. Records hold epoch milliseconds (`scored_ms`); only the
//! calendar arithmetic of UTC is needed, so it is done here rather than with a date library.

/// Milliseconds since the Unix epoch from `text`: an RFC 3339 timestamp
/// (`2026-03-03T14:05:00Z`, `2026-03-03T14:05:00.250+01:00`, a space instead of `T` too) or a
/// whole number of epoch milliseconds.
pub fn parse_instant(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse().map_err(|_| format!("{text:?} is too large for epoch milliseconds"));
    }
    rfc3339(text).ok_or_else(|| {
        format!(
            "{text:?} is neither an RFC 3339 timestamp (e.g. 2026-03-03T14:05:00Z or 2026-03-03T15:05:00+01:00) nor \
             epoch milliseconds (e.g. 1772546700000)"
        )
    })
}

fn rfc3339(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    let number = |from: usize, len: usize| -> Option<i64> {
        let piece = text.get(from..from + len)?;
        piece.bytes().all(|b| b.is_ascii_digit()).then(|| piece.parse().ok())?
    };
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if bytes.len() < 20
        || separators.iter().any(|&(at, sep)| bytes[at] != sep)
        || !matches!(bytes[10], b'T' | b't' | b' ')
    {
        return None;
    }
    let (year, month, day) = (number(0, 4)?, number(5, 2)?, number(8, 2)?);
    let (hour, minute, second) = (number(11, 2)?, number(14, 2)?, number(17, 2)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        // Milliseconds are all a record holds; finer digits are dropped.
        let kept = &fraction[..digits.min(3)];
        millis = kept.parse::<i64>().ok()? * 10i64.pow(3 - kept.len() as u32);
        rest = &fraction[digits..];
    }
    let offset_minutes = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let zone = rest.get(1..)?;
            if zone.len() != 5 || zone.as_bytes()[2] != b':' {
                return None;
            }
            let (hours, minutes): (i64, i64) = (zone[..2].parse().ok()?, zone[3..].parse().ok()?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            sign * (hours * 60 + minutes)
        }
    };
    let seconds =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second.min(59) - offset_minutes * 60;
    u64::try_from(seconds * 1000 + millis).ok()
}

/// `ms` (epoch milliseconds) as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_utc(ms: u64) -> String {
    let seconds = (ms / 1000) as i64;
    let (days, in_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60,
        ms % 1000
    )
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a date of the proleptic Gregorian calendar (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The date of a day counted from 1970-01-01: the inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (year_of_era + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_and_epoch_milliseconds_are_read() {
        assert_eq!(parse_instant("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_instant("2026-03-03T14:05:00Z"), Ok(1_772_546_700_000));
        assert_eq!(parse_instant("2026-03-03T15:05:00.25+01:00"), Ok(1_772_546_700_250));
        assert_eq!(parse_instant("2024-02-29 23:59:59.999-00:30"), parse_instant("2024-03-01T00:29:59.999Z"));
        assert_eq!(parse_instant("1772546700000"), Ok(1_772_546_700_000));
        for bad in ["2026-02-30T00:00:00Z", "2026-03-03", "2026-03-03T14:05:00", "yesterday", "", "-5"] {
            assert!(parse_instant(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn times_are_shown_in_utc_and_read_back() {
        assert_eq!(format_utc(1_772_546_700_250), "2026-03-03T14:05:00.250Z");
        assert_eq!(format_utc(0), "1970-01-01T00:00:00.000Z");
        for ms in [951_782_400_000u64, 1_709_251_199_999, 4_102_444_800_123] {
            assert_eq!(parse_instant(&format_utc(ms)), Ok(ms));
        }
    }
}
