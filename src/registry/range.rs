//! HTTP `Range` for blobs: single byte ranges, open-ended and suffix forms.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// No usable Range header: serve everything with 200.
    Full,
    /// Inclusive first and last byte: serve 206.
    Partial { first: u64, last: u64 },
    /// Syntactically fine but outside the content: 416.
    Unsatisfiable,
}

/// Interprets a Range header against content of `size` bytes. Anything
/// that is not a single `bytes=` range (multipart, other units, garbage) is
/// ignored, as RFC 9110 allows, and the whole content is served.
pub fn parse_range(header: Option<&str>, size: u64) -> ByteRange {
    let Some(h) = header else { return ByteRange::Full };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return ByteRange::Full;
    };
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return ByteRange::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    if a.is_empty() {
        // suffix: the last N bytes
        let Some(n) = num(b) else { return ByteRange::Full };
        if n == 0 || size == 0 {
            return ByteRange::Unsatisfiable;
        }
        return ByteRange::Partial {
            first: size.saturating_sub(n),
            last: size - 1,
        };
    }
    let Some(first) = num(a) else { return ByteRange::Full };
    let last = if b.is_empty() {
        None
    } else {
        match num(b) {
            Some(l) if l >= first => Some(l),
            _ => return ByteRange::Full,
        }
    };
    if first >= size {
        return ByteRange::Unsatisfiable;
    }
    ByteRange::Partial {
        first,
        last: last.unwrap_or(size - 1).min(size - 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ByteRange::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(parse_range(Some("bytes=0-3"), 10), Partial { first: 0, last: 3 });
        assert_eq!(parse_range(Some("bytes=4-"), 10), Partial { first: 4, last: 9 });
        assert_eq!(parse_range(Some("bytes=-3"), 10), Partial { first: 7, last: 9 });
        assert_eq!(parse_range(Some("bytes=-30"), 10), Partial { first: 0, last: 9 });
        assert_eq!(parse_range(Some("bytes=5-100"), 10), Partial { first: 5, last: 9 });
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), Full);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Full);
        assert_eq!(parse_range(Some("bytes=x-"), 10), Full);
    }
}
