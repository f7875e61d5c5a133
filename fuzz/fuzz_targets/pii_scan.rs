//! The PII scanner returns ordered, non-overlapping findings on char boundaries for any text.
#![no_main]

use handoff_core::policy::pii;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let mut found = Vec::new();
        pii::scan(s, &mut found);
        let mut at = 0;
        for f in &found {
            assert!(f.start >= at && f.end > f.start && s.is_char_boundary(f.start) && s.is_char_boundary(f.end));
            at = f.end;
        }
        let _ = pii::redact(s, &found);
    }
});
