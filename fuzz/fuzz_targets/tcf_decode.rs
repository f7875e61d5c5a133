//! Any input to the TC string decoder returns a value or an error, never a panic, and a decoded
//! string's vendor sets stay within u16 ids.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(tc) = handoff_core::consent::tcf::decode(s)
    {
        assert_eq!(tc.version, 2);
        let _ = tc.vendor_consents.iter().count();
    }
});
