//! What a client id may be: the one validation the server applies to every HELLO (a bad id
//! is refused with `BAD_HELLO`) and the clients apply before they send one.
//!
//! A client id is 1 to [`MAX_CLIENT_ID_LEN`] bytes of UTF-8 with none of these characters:
//!
//! | refused | why | examples |
//! |---|---|---|
//! | control characters (category Cc) | break logs and terminals | `\n`, `\t`, `\u{7f}`, `\u{9b}` |
//! | format characters (category Cf) | invisible or reorder text: one id can look like another on the status page and in logs | U+202E RIGHT-TO-LEFT OVERRIDE, U+200B ZERO WIDTH SPACE, U+200D ZERO WIDTH JOINER, U+FEFF, U+2066–2069 isolates, U+00AD SOFT HYPHEN, tag characters U+E0001, U+E0020–E007F |
//! | line and paragraph separators (Zl, Zp) | start a new line where no `\n` is | U+2028, U+2029 |
//!
//! Everything else is allowed (letters of any script, spaces, punctuation, emoji): the rule
//! removes the characters that make two ids *look* the same or break a line, not scripts.
//! Ids are compared byte for byte (no normalisation), so `é` precomposed and `e` + U+0301
//! are two ids; allowed-id patterns in credentials compare the same way.
//!
//! The format-character table is Unicode 15.1's category Cf, written out here because the
//! core has no dependencies (no Unicode tables crate); `tests` checks it against the
//! characters named above.

use thiserror::Error;

use crate::codec::MAX_CLIENT_ID_LEN;

/// Why a client id is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ClientIdError {
    /// The id is empty.
    #[error("client id is empty")]
    Empty,
    /// The id is longer than [`MAX_CLIENT_ID_LEN`] bytes.
    #[error("client id is {len} bytes; at most {MAX_CLIENT_ID_LEN} are allowed")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The id holds a character that is refused (see the module docs).
    #[error("client id contains {what} U+{code:04X} at byte {at}")]
    Character {
        /// What kind of character: "a control character", "a format character", "a line
        /// separator", "a paragraph separator".
        what: &'static str,
        /// Its code point.
        code: u32,
        /// Its byte offset in the id.
        at: usize,
    },
}

/// Unicode 15.1, general category Cf (format), as inclusive ranges.
const FORMAT: &[(u32, u32)] = &[
    (0x00AD, 0x00AD),
    (0x0600, 0x0605),
    (0x061C, 0x061C),
    (0x06DD, 0x06DD),
    (0x070F, 0x070F),
    (0x0890, 0x0891),
    (0x08E2, 0x08E2),
    (0x180E, 0x180E),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x2064),
    (0x2066, 0x206F),
    (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB),
    (0x110BD, 0x110BD),
    (0x110CD, 0x110CD),
    (0x13430, 0x1343F),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0001, 0xE0001),
    (0xE0020, 0xE007F),
];

/// Whether `c` is a Unicode format character (category Cf).
pub fn is_format_char(c: char) -> bool {
    let c = u32::from(c);
    // The table is sorted: find the last range starting at or before `c`.
    match FORMAT.binary_search_by(|&(lo, _)| lo.cmp(&c)) {
        Ok(_) => true,
        Err(0) => false,
        Err(i) => c <= FORMAT[i - 1].1,
    }
}

/// What is wrong with `c` in a client id, if anything.
fn refused(c: char) -> Option<&'static str> {
    match c {
        '\u{2028}' => Some("a line separator"),
        '\u{2029}' => Some("a paragraph separator"),
        c if c.is_control() => Some("a control character"),
        c if is_format_char(c) => Some("a format character"),
        _ => None,
    }
}

/// Checks a client id (see the module docs). The server refuses a HELLO whose id fails this
/// with `BAD_HELLO`; clients check before they connect.
pub fn check_client_id(id: &str) -> Result<(), ClientIdError> {
    if id.is_empty() {
        return Err(ClientIdError::Empty);
    }
    if id.len() > MAX_CLIENT_ID_LEN {
        return Err(ClientIdError::TooLong { len: id.len() });
    }
    match id
        .char_indices()
        .find_map(|(at, c)| refused(c).map(|w| (at, c, w)))
    {
        Some((at, c, what)) => Err(ClientIdError::Character {
            what,
            code: u32::from(c),
            at,
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_sorted_and_disjoint() {
        for w in FORMAT.windows(2) {
            assert!(w[0].0 <= w[0].1 && w[0].1 < w[1].0, "{w:x?}");
        }
    }

    #[test]
    fn format_characters_are_found_at_the_edges_of_their_ranges() {
        for &(lo, hi) in FORMAT {
            for c in [lo, hi] {
                assert!(is_format_char(char::from_u32(c).unwrap()), "{c:x}");
            }
            // The ranges are maximal: the code points around them are not format characters.
            if let Some(before) = char::from_u32(lo - 1) {
                assert!(!is_format_char(before), "{:x}", lo - 1);
            }
            if let Some(after) = char::from_u32(hi + 1) {
                assert!(!is_format_char(after), "{:x}", hi + 1);
            }
        }
        for c in [
            'a', ' ', 'é', 'ß', '中', '😀', '\u{0301}', '\u{00A0}', '\u{FFFD}',
        ] {
            assert!(!is_format_char(c), "{c:?}");
        }
    }

    #[test]
    fn ordinary_ids_of_any_script_pass() {
        for id in [
            "alice",
            "device-42",
            "a b",
            "Ünïcødé",
            "中文",
            "😀",
            "e\u{0301}",
            &"x".repeat(255),
        ] {
            assert_eq!(check_client_id(id), Ok(()), "{id:?}");
        }
    }

    #[test]
    fn spoofing_and_line_breaking_characters_are_refused_with_where() {
        let cases: &[(&str, &str, u32, usize)] = &[
            ("bob\u{202E}ecila", "a format character", 0x202E, 3),
            ("ali\u{200B}ce", "a format character", 0x200B, 3),
            ("a\u{200D}b", "a format character", 0x200D, 1),
            ("\u{FEFF}alice", "a format character", 0xFEFF, 0),
            ("a\u{2066}b\u{2069}", "a format character", 0x2066, 1),
            ("soft\u{00AD}hyphen", "a format character", 0x00AD, 4),
            ("tag\u{E0041}", "a format character", 0xE0041, 3),
            ("a\u{2028}b", "a line separator", 0x2028, 1),
            ("a\u{2029}b", "a paragraph separator", 0x2029, 1),
            ("a\nb", "a control character", 0x0A, 1),
            ("a\u{7f}", "a control character", 0x7F, 1),
            ("a\u{9b}", "a control character", 0x9B, 1),
        ];
        for &(id, what, code, at) in cases {
            assert_eq!(
                check_client_id(id),
                Err(ClientIdError::Character { what, code, at }),
                "{id:?}"
            );
        }
        assert_eq!(check_client_id(""), Err(ClientIdError::Empty));
        assert_eq!(
            check_client_id(&"x".repeat(256)),
            Err(ClientIdError::TooLong { len: 256 })
        );
        assert_eq!(
            check_client_id("bob\u{202E}ecila").unwrap_err().to_string(),
            "client id contains a format character U+202E at byte 3"
        );
    }
}
