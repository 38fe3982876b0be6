//! Feed dates: W3C-DTF / RFC 3339 / ISO 8601, RFC 822 and asctime to unix seconds, and back
//! to RFC 3339 UTC.

/// Parses the date formats found in feeds to unix seconds (UTC): W3C-DTF / RFC 3339 / ISO 8601
/// (with the partial forms `YYYY`, `YYYY-MM`, `YYYY-MM-DD`), RFC 822/2822 with the usual
/// deviations, and asctime. Out-of-range fields roll over, as feed readers do.
pub(super) fn parse_date(text: &str) -> Option<i64> {
    let s = text.trim();
    if s.is_empty() {
        return None;
    }
    parse_w3dtf(s)
        .or_else(|| parse_rfc822(s))
        .or_else(|| parse_asctime(s))
}

/// `YYYY-MM-DDTHH:MM:SS.sss±HH:MM` and its looser and partial forms.
fn parse_w3dtf(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let digits = |from: usize, n: usize| -> Option<i64> {
        let part = b.get(from..from + n)?;
        if part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part).ok()?.parse().ok()
        } else {
            None
        }
    };
    let year = digits(0, 4)?;
    let mut i = 4;
    let (mut month, mut day) = (1, 1);
    if b.get(i) == Some(&b'-') {
        month = digits(i + 1, 2)?;
        i += 3;
        if b.get(i) == Some(&b'-') {
            day = digits(i + 1, 2)?;
            i += 3;
        }
    } else if let (Some(m), Some(d)) = (digits(4, 2), digits(6, 2)) {
        month = m;
        day = d;
        i = 8;
    }
    if b.get(i).is_some_and(u8::is_ascii_digit) {
        return None;
    }
    let date_secs = civil_to_days(year, month, day)? * 86_400;
    // Separator: 'T' and/or spaces.
    let mut j = i;
    while b.get(j) == Some(&b' ') {
        j += 1;
    }
    if matches!(b.get(j), Some(b'T') | Some(b't')) {
        j += 1;
    }
    while b.get(j) == Some(&b' ') {
        j += 1;
    }
    if j == b.len() {
        return (i == j || s[i..].trim().is_empty()).then_some(date_secs);
    }
    if j == i {
        return None;
    }
    // Time.
    let (Some(hour), Some(b':')) = (digits(j, 2), b.get(j + 2)) else {
        // A time we cannot read: the day itself, at midnight UTC.
        return Some(date_secs);
    };
    let minute = digits(j + 3, 2)?;
    let mut k = j + 5;
    let mut second = 0;
    if b.get(k) == Some(&b':') {
        second = digits(k + 1, 2)?;
        k += 3;
        if matches!(b.get(k), Some(b'.') | Some(b',')) {
            k += 1;
            while b.get(k).is_some_and(u8::is_ascii_digit) {
                k += 1;
            }
        }
    }
    while b.get(k) == Some(&b' ') {
        k += 1;
    }
    let offset = match b.get(k) {
        None => 0,
        Some(b'Z') | Some(b'z') if k + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) => {
            let rest = &s[k + 1..];
            let (h, m) = match rest.len() {
                2 => (rest.parse::<i64>().ok()?, 0),
                4 => (
                    rest[..2].parse::<i64>().ok()?,
                    rest[2..].parse::<i64>().ok()?,
                ),
                5 if rest.as_bytes()[2] == b':' => (
                    rest[..2].parse::<i64>().ok()?,
                    rest[3..].parse::<i64>().ok()?,
                ),
                _ => return None,
            };
            let off = h * 3600 + m * 60;
            if sign == b'-' {
                -off
            } else {
                off
            }
        }
        _ => return None,
    };
    Some(date_secs + hour * 3600 + minute * 60 + second - offset)
}

/// RFC 822 as feeds write it: `[Day,] DD Mon YY[YY] HH:MM[:SS] [zone]` (day and month may be
/// swapped; a missing time is midnight; an unknown zone is UTC).
fn parse_rfc822(s: &str) -> Option<i64> {
    let lower = s.to_ascii_lowercase();
    let mut parts: Vec<&str> = lower.split_whitespace().collect();
    if parts.len() < 5 {
        parts.extend(["00:00:00", "0000"]);
    }
    const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    if parts
        .first()
        .is_some_and(|p| DAYS.contains(&p.get(..3).unwrap_or(p)))
    {
        parts.remove(0);
    }
    if parts.len() < 5 {
        return None;
    }
    let month_of = |p: &str| month_number(p.get(..3).unwrap_or(p));
    let (day, month) = match parts[0].parse::<i64>() {
        Ok(d) => (d, month_of(parts[1])?),
        Err(_) => (parts[1].parse::<i64>().ok()?, month_of(parts[0])?),
    };
    let mut year: i64 = parts[2].parse().ok()?;
    if parts[2].len() <= 2 {
        year += if year < 90 { 2000 } else { 1900 };
    }
    let mut time = parts[3].split(':');
    let hour: i64 = time.next()?.parse().ok()?;
    let minute: i64 = time.next().unwrap_or("0").parse().ok()?;
    let second: i64 = time.next().unwrap_or("0").parse().ok()?;
    if !(0..24).contains(&hour) || !(0..60).contains(&minute) || !(0..62).contains(&second) {
        return None;
    }
    if day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let offset = zone_offset(parts[4])?;
    Some(civil_to_days(year, month, day)? * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// `Sun Jan  4 16:29:06 [PST] 2004`.
fn parse_asctime(s: &str) -> Option<i64> {
    let lower = s.to_ascii_lowercase();
    let parts: Vec<&str> = lower.split_whitespace().collect();
    let (zone, year) = match parts.len() {
        5 => ("utc", parts[4]),
        6 => (parts[4], parts[5]),
        _ => return None,
    };
    let month = month_number(parts[1].get(..3)?)?;
    let day: i64 = parts[2].parse().ok()?;
    let year: i64 = year.parse().ok()?;
    let mut time = parts[3].split(':');
    let hour: i64 = time.next()?.parse().ok()?;
    let minute: i64 = time.next()?.parse().ok()?;
    let second: i64 = time.next().unwrap_or("0").parse().ok()?;
    if day < 1 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 61 {
        return None;
    }
    let offset = zone_offset(zone)?;
    Some(civil_to_days(year, month, day)? * 86_400 + hour * 3600 + minute * 60 + second - offset)
}

/// Seconds east of UTC for an RFC 822 zone (`+0500`, `-05:00`, `GMT+1`, `EST` …); unknown
/// names count as UTC.
fn zone_offset(zone: &str) -> Option<i64> {
    let mut zone = zone.strip_prefix("etc/").unwrap_or(zone).to_string();
    if let Some(rest) = zone.strip_prefix("gmt") {
        let rest = rest.replace(':', "");
        zone = if rest.is_empty() { "gmt".into() } else { rest };
    }
    let b = zone.as_bytes();
    if let Some(&sign @ (b'+' | b'-')) = b.first() {
        let (h, m) = if zone.contains(':') {
            (
                zone.get(1..3)?.parse::<i64>().ok()?,
                zone.get(4..)?.parse::<i64>().unwrap_or(0),
            )
        } else {
            (
                zone.get(1..3)?.parse::<i64>().ok()?,
                zone.get(3..)
                    .filter(|m| !m.is_empty())
                    .map_or(Some(0), |m| m.parse::<i64>().ok())?,
            )
        };
        let off = h * 3600 + m * 60;
        return Some(if sign == b'-' { -off } else { off });
    }
    let hours = match zone.as_str() {
        "adt" => -3,
        "ast" | "at" | "edt" => -4,
        "est" | "et" | "cdt" => -5,
        "cst" | "ct" | "mdt" => -6,
        "mst" | "mt" | "pdt" => -7,
        "pst" | "pt" => -8,
        _ => 0,
    };
    Some(hours * 3600)
}

fn month_number(abbrev: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ];
    MONTHS
        .iter()
        .position(|m| *m == abbrev)
        .and_then(|i| i64::try_from(i + 1).ok())
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a civil date; month and day may be out of range and roll over.
fn civil_to_days(year: i64, month: i64, day: i64) -> Option<i64> {
    if !(0..=9999).contains(&year) || !(0..=99).contains(&month) || !(0..=99).contains(&day) {
        return None;
    }
    let year = year + (month - 1).div_euclid(12);
    let month = (month - 1).rem_euclid(12) + 1;
    // Howard Hinnant's days_from_civil.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468 + (day - 1))
}

/// `YYYY-MM-DDTHH:MM:SSZ` for unix seconds.
pub(super) fn format_rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
