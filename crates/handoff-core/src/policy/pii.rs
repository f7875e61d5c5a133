//! PII detection in free text: e-mail addresses, phone numbers, payment card numbers (Luhn),
//! IBANs (mod-97) and US social security numbers.
//!
//! One left-to-right pass per string with hand-written recognisers, each looking at a bounded
//! window, instead of one regex per kind per field (see the policy benchmark for the cost).

/// What was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PiiKind {
    Email,
    Phone,
    Card,
    Iban,
    Ssn,
}

impl PiiKind {
    pub fn code(self) -> &'static str {
        match self {
            PiiKind::Email => "email",
            PiiKind::Phone => "phone",
            PiiKind::Card => "card",
            PiiKind::Iban => "iban",
            PiiKind::Ssn => "ssn",
        }
    }
}

/// A byte range of the scanned string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    pub kind: PiiKind,
    pub start: usize,
    pub end: usize,
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_domain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')
}

/// Appends every finding in `s` to `out`, in order, without overlaps.
pub fn scan(s: &str, out: &mut Vec<Finding>) {
    let b = s.as_bytes();
    // Every kind has a digit or an '@', and none is shorter than 6 bytes ("a@b.co"): most
    // strings (names, titles, URLs without numbers) are dismissed by this one pass, written as
    // a fold so that it compiles to SIMD compares.
    if b.len() < 6
        || !b
            .iter()
            .fold(false, |acc, &c| acc | c.is_ascii_digit() | (c == b'@'))
    {
        return;
    }
    let first = out.len();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let boundary = i == 0 || !is_word(b[i - 1]);
        // `@`, or `%40` as it appears in URLs (`?email=jane%40example.com`).
        let at_len = match c {
            b'@' => 1,
            b'%' if b.get(i + 1..i + 3) == Some(b"40") => 3,
            _ => 0,
        };
        if at_len > 0 {
            if let Some((start, end)) = email_at(b, i, at_len) {
                // An e-mail wins over a number found inside its local part.
                while out.len() > first && out.last().is_some_and(|f| f.end > start) {
                    out.pop();
                }
                out.push(Finding {
                    kind: PiiKind::Email,
                    start,
                    end,
                });
                i = end;
                continue;
            }
        } else if boundary
            && (c.is_ascii_digit()
                || ((c == b'+' || c == b'(') && b.get(i + 1).is_some_and(u8::is_ascii_digit)))
        {
            let end = number_at(b, i, out);
            i = end.max(i + 1);
            continue;
        } else if boundary
            && c.is_ascii_uppercase()
            && let Some(end) = iban_at(b, i)
        {
            out.push(Finding {
                kind: PiiKind::Iban,
                start: i,
                end,
            });
            i = end;
            continue;
        }
        i += 1;
    }
}

fn email_at(b: &[u8], at: usize, at_len: usize) -> Option<(usize, usize)> {
    let mut start = at;
    while start > 0 && at - start < 64 && is_local(b[start - 1]) {
        start -= 1;
    }
    while start < at && !b[start].is_ascii_alphanumeric() {
        start += 1;
    }
    if start == at {
        return None;
    }
    let domain_start = at + at_len;
    let mut end = domain_start;
    while end < b.len() && end - at < 255 && is_domain(b[end]) {
        end += 1;
    }
    while end > domain_start && matches!(b[end - 1], b'.' | b'-') {
        end -= 1;
    }
    let domain = &b[domain_start..end];
    let dot = domain.iter().rposition(|&c| c == b'.')?;
    // The top-level domain is letters; `a@example.com-1` is `a@example.com` and a suffix.
    let tld = domain[dot + 1..]
        .iter()
        .take_while(|c| c.is_ascii_alphabetic())
        .count();
    (dot > 0 && tld >= 2).then_some((start, domain_start + dot + 1 + tld))
}

/// Longest digit run looked at; longer runs are not one number of any kind we know.
const MAX_RUN_DIGITS: usize = 64;
/// Most digit groups (separated by spaces, dashes, dots, brackets) tracked in one run.
const MAX_GROUPS: usize = 16;

/// Reads a run of digits with single separators from `start`, appends what it finds to `out`,
/// and returns where the run ends. The whole run is tried first (a card, an SSN, a phone
/// number); failing that, windows of whole digit groups, so that a card number followed by an
/// expiry date or preceded by a reference number is still found.
fn number_at(b: &[u8], start: usize, out: &mut Vec<Finding>) -> usize {
    let plus = b[start] == b'+';
    let mut digits = [0u8; MAX_RUN_DIGITS];
    let mut n = 0usize;
    // For each digit, the separator that follows it (0 for none).
    let mut seps = [0u8; MAX_RUN_DIGITS];
    // Groups: (byte start, byte end, first digit index, digit count).
    let mut groups = [(0usize, 0usize, 0usize, 0usize); MAX_GROUPS];
    let mut g = 0usize;
    let mut i = start + usize::from(plus);
    let mut end = i;
    let mut run_sep = 0;
    let mut too_long = false;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_digit() {
            if n == MAX_RUN_DIGITS {
                too_long = true;
                while i < b.len() && (b[i].is_ascii_digit() || matches!(b[i], b' ' | b'-' | b'.')) {
                    i += 1;
                }
                end = i;
                break;
            }
            if n == 0 || run_sep > 0 {
                if g < MAX_GROUPS {
                    groups[g] = (i, i + 1, n, 0);
                }
                g += 1;
            }
            if g <= MAX_GROUPS {
                groups[g - 1].1 = i + 1;
                groups[g - 1].3 += 1;
            }
            digits[n] = c - b'0';
            n += 1;
            run_sep = 0;
            end = i + 1;
        } else if matches!(c, b' ' | b'-' | b'.' | b'(' | b')') && run_sep < 2 {
            if n > 0 {
                seps[n - 1] = c;
            }
            run_sep += 1;
        } else {
            break;
        }
        i += 1;
    }
    if too_long || b.get(end).is_some_and(|&c| is_word(c)) {
        return end;
    }
    let d = &digits[..n];
    let whole = if (13..=19).contains(&n) && luhn(d) {
        Some(PiiKind::Card)
    } else if n == 9 && seps[2] == seps[4] && matches!(seps[2], b'-' | b' ') && valid_ssn(d) {
        Some(PiiKind::Ssn)
    } else if (plus && (8..=15).contains(&n)) || nanp(d, &seps, b[start] == b'(') {
        Some(PiiKind::Phone)
    } else {
        None
    };
    if let Some(kind) = whole {
        out.push(Finding { kind, start, end });
        return end;
    }
    // Windows of whole groups, left to right, longest first.
    let groups = &groups[..g.min(MAX_GROUPS)];
    let mut first = 0;
    while first < groups.len() {
        let mut found = None;
        for last in (first..groups.len()).rev() {
            let (from, to) = (groups[first].2, groups[last].2 + groups[last].3);
            let window = &digits[from..to];
            let ssn_shape = last == first + 2
                && (groups[first].3, groups[first + 1].3, groups[last].3) == (3, 2, 4)
                && seps[from + 2] == seps[from + 4]
                && matches!(seps[from + 2], b'-' | b' ');
            let kind = if (13..=19).contains(&window.len()) && luhn(window) {
                Some(PiiKind::Card)
            } else if ssn_shape && valid_ssn(window) {
                Some(PiiKind::Ssn)
            } else {
                None
            };
            if let Some(kind) = kind {
                found = Some((kind, last));
                break;
            }
        }
        match found {
            Some((kind, last)) => {
                out.push(Finding {
                    kind,
                    start: groups[first].0,
                    end: groups[last].1,
                });
                first = last + 1;
            }
            None => first += 1,
        }
    }
    end
}

/// A North American number written the way people write them: `(415) 555-0132`,
/// `415-555-0132`, `415.555.0132`, `1 415 555 0132`. Ten bare digits are not matched: ids look
/// like that too.
fn nanp(d: &[u8], seps: &[u8; MAX_RUN_DIGITS], paren: bool) -> bool {
    let (d, offset) = match d.len() {
        10 => (d, 0),
        11 if d[0] == 1 => (&d[1..], 1),
        _ => return false,
    };
    let sep_after_area = seps[offset + 2] != 0 || paren;
    let sep_after_exchange = seps[offset + 5] != 0;
    d[0] >= 2 && d[3] >= 2 && sep_after_area && sep_after_exchange
}

fn valid_ssn(d: &[u8]) -> bool {
    let area = u32::from(d[0]) * 100 + u32::from(d[1]) * 10 + u32::from(d[2]);
    let group = d[3] * 10 + d[4];
    let serial = d[5..].iter().any(|&x| x != 0);
    area != 0 && area != 666 && area < 900 && group != 0 && serial
}

fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 { y - 9 } else { y }
            } else {
                x
            }
        })
        .sum();
    sum.is_multiple_of(10) && d.iter().any(|&x| x != 0)
}

/// An IBAN: country letters, check digits, 11–30 letters or digits, optionally in groups of
/// four separated by single spaces; valid when its mod-97 remainder is 1.
fn iban_at(b: &[u8], start: usize) -> Option<usize> {
    if b.len() < start + 15
        || !b[start + 1].is_ascii_uppercase()
        || !b[start + 2].is_ascii_digit()
        || !b[start + 3].is_ascii_digit()
    {
        return None;
    }
    let mut chars = [0u8; 34];
    let mut ends = [0usize; 34];
    let mut n = 0;
    let mut i = start;
    while i < b.len() && n < 34 {
        let c = b[i];
        let group_space = c == b' '
            && b.get(i + 1)
                .is_some_and(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        if c.is_ascii_uppercase() || c.is_ascii_digit() {
            chars[n] = c;
            ends[n] = i + 1;
            n += 1;
        } else if !group_space {
            break;
        }
        i += 1;
    }
    // Longest candidate first, each ending at a word boundary.
    (15..=n).rev().find_map(|len| {
        let end = ends[len - 1];
        let boundary = b.get(end).is_none_or(|&c| !is_word(c));
        (boundary && mod97(&chars[..len]) == 1).then_some(end)
    })
}

fn mod97(iban: &[u8]) -> u32 {
    let rearranged = iban[4..].iter().chain(&iban[..4]);
    let mut r = 0u32;
    for &c in rearranged {
        let v = if c.is_ascii_digit() {
            u32::from(c - b'0')
        } else {
            u32::from(c - b'A') + 10
        };
        r = if v >= 10 {
            (r * 100 + v) % 97
        } else {
            (r * 10 + v) % 97
        };
    }
    r
}

/// `s` with every finding replaced by `[redacted:<kind>]`.
pub fn redact(s: &str, findings: &[Finding]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut at = 0;
    for f in findings {
        out.push_str(&s[at..f.start]);
        out.push_str("[redacted:");
        out.push_str(f.kind.code());
        out.push(']');
        at = f.end;
    }
    out.push_str(&s[at..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(s: &str) -> Vec<(PiiKind, &str)> {
        let mut v = Vec::new();
        scan(s, &mut v);
        v.iter().map(|f| (f.kind, &s[f.start..f.end])).collect()
    }

    #[test]
    fn finds_each_kind() {
        assert_eq!(
            kinds("mail me: Jane.Doe+x@example.co.uk."),
            vec![(PiiKind::Email, "Jane.Doe+x@example.co.uk")]
        );
        assert_eq!(
            kinds("card 4111 1111 1111 1111 ok"),
            vec![(PiiKind::Card, "4111 1111 1111 1111")]
        );
        assert_eq!(
            kinds("card 4111-1111-1111-1111"),
            vec![(PiiKind::Card, "4111-1111-1111-1111")]
        );
        assert_eq!(
            kinds("amex 378282246310005"),
            vec![(PiiKind::Card, "378282246310005")]
        );
        assert_eq!(
            kinds("iban DE89 3704 0044 0532 0130 00 thanks"),
            vec![(PiiKind::Iban, "DE89 3704 0044 0532 0130 00")]
        );
        assert_eq!(
            kinds("GB82WEST12345698765432"),
            vec![(PiiKind::Iban, "GB82WEST12345698765432")]
        );
        assert_eq!(
            kinds("ssn 123-45-6789"),
            vec![(PiiKind::Ssn, "123-45-6789")]
        );
        assert_eq!(
            kinds("call +44 20 7946 0958"),
            vec![(PiiKind::Phone, "+44 20 7946 0958")]
        );
        assert_eq!(
            kinds("call (415) 555-0132 now"),
            vec![(PiiKind::Phone, "(415) 555-0132")]
        );
        assert_eq!(
            kinds("or 415.555.0132"),
            vec![(PiiKind::Phone, "415.555.0132")]
        );
        assert_eq!(
            kinds("id jane.doe@example.com-1"),
            vec![(PiiKind::Email, "jane.doe@example.com")]
        );
        assert_eq!(
            kinds("https://shop.example/c?email=jane%40example.com&x=1"),
            vec![(PiiKind::Email, "jane%40example.com")]
        );
    }

    #[test]
    fn numbers_inside_longer_runs_are_found_by_their_groups() {
        assert_eq!(
            kinds("4111 1111 1111 1111 12/27"),
            vec![(PiiKind::Card, "4111 1111 1111 1111")]
        );
        assert_eq!(
            kinds("4111 1111 1111 1111 123"),
            vec![(PiiKind::Card, "4111 1111 1111 1111")]
        );
        assert_eq!(
            kinds("ref 12 4111111111111111"),
            vec![(PiiKind::Card, "4111111111111111")]
        );
        assert_eq!(
            kinds("card 4242-4242-4242-4242 ssn 078-05-1120"),
            vec![
                (PiiKind::Card, "4242-4242-4242-4242"),
                (PiiKind::Ssn, "078-05-1120")
            ]
        );
        assert_eq!(
            kinds("12 078-05-1120 9"),
            vec![(PiiKind::Ssn, "078-05-1120")]
        );
    }

    #[test]
    fn leaves_look_alikes_alone() {
        for s in [
            "order 4111111111111112", // fails Luhn
            "sku 1234567890",         // ten bare digits: an id
            "ssn-ish 000-12-3456",    // area 000 is never issued
            "ssn-ish 666-12-3456",
            "DE00 3704 0044 0532 0130 00", // wrong check digits
            "version 1.2.3 on 2026-11-25",
            "user@localhost",
            "abc4111111111111111", // inside a word
            "",
            "naïve café 東京",
        ] {
            assert_eq!(kinds(s), vec![], "{s}");
        }
    }

    #[test]
    fn redacts_in_place() {
        let s = "a@b.co paid with 4242 4242 4242 4242";
        let mut f = Vec::new();
        scan(s, &mut f);
        assert_eq!(redact(s, &f), "[redacted:email] paid with [redacted:card]");
    }

    proptest::proptest! {
        #[test]
        fn never_panics_and_findings_are_ordered(s in "\\PC{0,200}") {
            let mut f = Vec::new();
            scan(&s, &mut f);
            let mut at = 0;
            for x in &f {
                proptest::prop_assert!(x.start >= at && x.end > x.start && x.end <= s.len());
                proptest::prop_assert!(s.is_char_boundary(x.start) && s.is_char_boundary(x.end));
                at = x.end;
            }
            let _ = redact(&s, &f);
        }
    }
}
