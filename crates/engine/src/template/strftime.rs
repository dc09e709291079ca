//! `strftime_now(format)`, the function `transformers` gives chat templates (Llama 3.x templates
//! write today's date into their system prompt with it): Python's
//! `datetime.now().strftime(format)`, the local time in the user's time zone (the `TZ`
//! variable, else the system's zone; UTC when neither is known), formatted by `jiff`'s
//! `strftime`. Formatting is lenient, as C's `strftime` is: a directive `jiff` does not know
//! does not fail the template.

use jiff::fmt::strtime::{BrokenDownTime, Config};
use jiff::Zoned;

/// `strftime_now(format)`: the current local time formatted like Python's `strftime`.
pub(super) fn strftime_now(format: &str) -> Result<String, minijinja::Error> {
    Ok(format_time(format, &Zoned::now()))
}

/// `time` formatted like C's `strftime` (the directives Python documents, glibc's `-` flag as in
/// `%-d`); lenient, so an unknown directive is no error.
fn format_time(format: &str, time: &Zoned) -> String {
    let config = Config::new().lenient(true);
    BrokenDownTime::from(time)
        .to_string_with_config(&config, format)
        .unwrap_or_else(|_| format.to_string())
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::jinja;
    use super::super::Message;
    use super::*;

    #[test]
    fn strftime_now_renders_a_date() {
        let out = jinja("{{ strftime_now('%Y-%m-%d') }}")
            .render(&[Message::user("x")], true)
            .expect("renders");
        let bytes = out.as_bytes();
        assert_eq!(out.len(), 10, "{out}");
        assert!(bytes[4] == b'-' && bytes[7] == b'-', "{out}");
        assert_eq!(out, Zoned::now().strftime("%Y-%m-%d").to_string());
    }

    fn at(secs: i64, zone: &str) -> Zoned {
        let tz = jiff::tz::TimeZone::get(zone).expect("a zone of the system's database");
        jiff::Timestamp::from_second(secs)
            .expect("in range")
            .to_zoned(tz)
    }

    #[test]
    fn formats_like_python() {
        // Python: datetime(2024, 2, 29, 13, 5, 9, tzinfo=timezone.utc).strftime(...)
        let utc = at(1_709_211_909, "UTC");
        assert_eq!(
            format_time("%Y-%m-%d %H:%M:%S|%d %b %Y|%A %a %B %j %I%p %y|%%|%e", &utc),
            "2024-02-29 13:05:09|29 Feb 2024|Thursday Thu February 060 01PM 24|%|29"
        );
        assert_eq!(
            format_time("%-d %-m %F %T %D %R", &utc),
            "29 2 2024-02-29 13:05:09 02/29/24 13:05"
        );
        // Llama 3.1's system prompt.
        assert_eq!(format_time("%d %b %Y", &utc), "29 Feb 2024");
        assert_eq!(
            format_time("%Y-%m-%d %H:%M:%S %a", &at(-1, "UTC")),
            "1969-12-31 23:59:59 Wed"
        );
    }

    #[test]
    fn the_local_zone_is_used() {
        // 23:30 UTC on 29 Feb is already 1 March in Tokyo, still 29 Feb in New York.
        let secs = 1_709_249_400;
        assert_eq!(
            format_time("%F %H:%M", &at(secs, "Asia/Tokyo")),
            "2024-03-01 08:30"
        );
        assert_eq!(
            format_time("%F %H:%M", &at(secs, "America/New_York")),
            "2024-02-29 18:30"
        );
    }

    #[test]
    fn unknown_directives_do_not_fail() {
        let utc = at(0, "UTC");
        let out = format_time("%Y %K %", &utc);
        assert!(out.starts_with("1970"), "{out}");
    }
}
