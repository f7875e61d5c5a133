//! Any input to the TC string decoder returns a value or an error, never a panic; what it
//! decodes respects the format's bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(tc) = handoff_core::consent::tcf::decode(s)
    {
        assert!(tc.purposes_consent.iter().all(|p| (1..=24).contains(p)));
        assert!(tc.special_feature_opt_ins.iter().all(|f| (1..=12).contains(f)));
        // Restrictions are merged by purpose and type: at most 24 x 3 entries.
        assert!(tc.publisher_restrictions.len() <= 72);
        assert!(tc.publisher_restrictions.iter().all(|r| (1..=24).contains(&r.purpose)));
        assert_eq!(tc.consent_language.len(), 2);
    }
});
