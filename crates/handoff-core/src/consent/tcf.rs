//! IAB TCF v2.2 TC strings, decoded by our own reader.
//!
//! A TC string is one or more segments joined by `.`, each base64url (no padding) of a bit
//! string. The first is the core segment; the optional others start with a 3-bit segment type:
//! 1 = disclosed vendors, 3 = publisher TC (2, "allowed vendors", was retired in 2.2 and is
//! skipped). Field widths follow the IAB's "TCF v2 Consent string and vendor list formats"
//! specification. Anything that does not follow it is an error, never a partial consent.

use std::collections::BTreeSet;

use serde::Serialize;

use base64::Engine;
use base64::alphabet::URL_SAFE;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};

/// base64url without padding, tolerant of padding and of non-zero bits after the last whole
/// byte (some encoders leave them; they carry no field).
const TC_BASE64: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// The largest TC string we decode (bytes). Real strings with range encoding stay far below; a
/// bitfield over all ~1,000 registered vendors is ~250 characters per section.
pub const MAX_TC_STRING_LEN: usize = 16 * 1024;

/// Why a TC string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TcfError {
    #[error("the TC string is empty")]
    Empty,
    #[error("the TC string is longer than {MAX_TC_STRING_LEN} bytes")]
    TooLong,
    #[error("segment {0} is not base64url")]
    Base64(usize),
    #[error("the string ends inside the {0} field")]
    Truncated(&'static str),
    #[error("version {0} is not TCF v2")]
    Version(u64),
    #[error("segment {0} has unknown segment type {1}")]
    SegmentType(usize, u64),
    #[error("segment type {0} appears twice")]
    DuplicateSegment(u64),
    #[error("a vendor range runs backwards ({0}..{1})")]
    Range(u16, u16),
    #[error("vendor id 0 is not a valid vendor")]
    VendorZero,
    #[error("a vendor id exceeds the section's maxVendorId")]
    VendorAboveMax,
    #[error("publisher restriction type {0} is not defined")]
    RestrictionType(u8),
    #[error("the {0} field holds a value that is not a letter")]
    Letter(&'static str),
    #[error("publisher restriction for purpose {0}, which does not exist (1-24)")]
    Purpose(u8),
}

/// A set of vendor ids (1–65,535) as a bitset: membership and range inserts are O(1) per word,
/// so a hostile string with thousands of wide ranges costs microseconds, not a CPU-second.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct VendorSet {
    words: Vec<u64>,
}

impl VendorSet {
    pub fn contains(&self, id: u16) -> bool {
        let (w, b) = (usize::from(id) / 64, usize::from(id) % 64);
        self.words.get(w).is_some_and(|word| word & (1 << b) != 0)
    }

    pub fn insert(&mut self, id: u16) {
        self.insert_range(id, id);
    }

    /// Inserts `start..=end`.
    pub fn insert_range(&mut self, start: u16, end: u16) {
        let (start, end) = (usize::from(start), usize::from(end));
        if end / 64 >= self.words.len() {
            self.words.resize(end / 64 + 1, 0);
        }
        let mut id = start;
        while id <= end {
            let (w, b) = (id / 64, id % 64);
            let span = (64 - b).min(end - id + 1);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << b
            };
            self.words[w] |= mask;
            id += span;
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.words.iter().enumerate().flat_map(|(w, word)| {
            (0..64)
                .filter(move |b| word & (1u64 << b) != 0)
                .map(move |b| (w * 64 + b) as u16)
        })
    }

    pub fn len(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }
}

impl Serialize for VendorSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl std::fmt::Debug for VendorSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

impl Serialize for RestrictionType {
    /// As encoded: 0 not allowed, 1 require consent, 2 require legitimate interest.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(*self as u8)
    }
}

impl<const N: usize> From<[u16; N]> for VendorSet {
    fn from(ids: [u16; N]) -> Self {
        let mut set = VendorSet::default();
        for id in ids {
            set.insert(id);
        }
        set
    }
}

/// How a publisher restricts a vendor's processing for one purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum RestrictionType {
    /// 0: the vendor may not process for this purpose at all.
    NotAllowed,
    /// 1: the vendor may only rely on consent.
    RequireConsent,
    /// 2: the vendor may only rely on legitimate interest.
    RequireLegitimateInterest,
}

/// One publisher restriction: a purpose, a type, and the vendors it applies to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublisherRestriction {
    pub purpose: u8,
    pub restriction: RestrictionType,
    pub vendors: VendorSet,
}

/// The publisher TC segment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PublisherTc {
    pub purposes_consent: BTreeSet<u8>,
    pub purposes_li_transparency: BTreeSet<u8>,
    pub custom_purposes_consent: BTreeSet<u8>,
    pub custom_purposes_li_transparency: BTreeSet<u8>,
}

/// A decoded TC string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TcString {
    pub version: u8,
    /// Deciseconds since the Unix epoch, as encoded.
    pub created_ds: u64,
    pub last_updated_ds: u64,
    pub cmp_id: u16,
    pub cmp_version: u16,
    pub consent_screen: u8,
    /// Two upper-case letters, e.g. `EN`.
    pub consent_language: String,
    pub vendor_list_version: u16,
    pub policy_version: u8,
    pub is_service_specific: bool,
    pub use_non_standard_texts: bool,
    pub special_feature_opt_ins: BTreeSet<u8>,
    /// Purposes 1–24 the user consented to.
    pub purposes_consent: BTreeSet<u8>,
    /// Purposes 1–24 for which legitimate interest was disclosed and not objected to.
    pub purposes_li_transparency: BTreeSet<u8>,
    pub purpose_one_treatment: bool,
    /// Two upper-case letters.
    pub publisher_cc: String,
    pub vendor_consents: VendorSet,
    pub vendor_legitimate_interests: VendorSet,
    pub publisher_restrictions: Vec<PublisherRestriction>,
    pub disclosed_vendors: Option<VendorSet>,
    pub publisher_tc: Option<PublisherTc>,
}

impl TcString {
    /// The restriction a publisher placed on `vendor` for `purpose`, if any.
    pub fn restriction(&self, purpose: u8, vendor: u16) -> Option<RestrictionType> {
        self.publisher_restrictions
            .iter()
            .filter(|r| r.purpose == purpose && r.vendors.contains(vendor))
            .map(|r| r.restriction)
            .min()
    }
}

struct Bits<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Bits<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Bits { bytes, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() * 8 - self.pos
    }

    fn read(&mut self, width: usize, field: &'static str) -> Result<u64, TcfError> {
        debug_assert!(width <= 64);
        if self.remaining() < width {
            return Err(TcfError::Truncated(field));
        }
        let mut v = 0u64;
        for _ in 0..width {
            let byte = self.bytes[self.pos / 8];
            let bit = (byte >> (7 - (self.pos % 8))) & 1;
            v = (v << 1) | u64::from(bit);
            self.pos += 1;
        }
        Ok(v)
    }

    fn flag(&mut self, field: &'static str) -> Result<bool, TcfError> {
        Ok(self.read(1, field)? == 1)
    }

    /// A fixed-width bitfield whose bit `i` (from 0) stands for id `i + 1`.
    fn id_set(&mut self, width: usize, field: &'static str) -> Result<BTreeSet<u8>, TcfError> {
        let mut set = BTreeSet::new();
        for id in 1..=width {
            if self.flag(field)? {
                set.insert(id as u8);
            }
        }
        Ok(set)
    }

    fn letters(&mut self, field: &'static str) -> Result<String, TcfError> {
        let mut s = String::with_capacity(2);
        for _ in 0..2 {
            let n = self.read(6, field)? as u8;
            // 0 = 'A' … 25 = 'Z'; anything else cannot be a letter.
            if n > 25 {
                return Err(TcfError::Letter(field));
            }
            s.push((b'A' + n) as char);
        }
        Ok(s)
    }

    /// `NumEntries` followed by entries of single ids or ranges.
    fn ranges(
        &mut self,
        max: Option<u16>,
        field: &'static str,
        set: &mut VendorSet,
    ) -> Result<(), TcfError> {
        let entries = self.read(12, field)?;
        for _ in 0..entries {
            let is_range = self.flag(field)?;
            let start = self.read(16, field)? as u16;
            let end = if is_range {
                self.read(16, field)? as u16
            } else {
                start
            };
            if start == 0 {
                return Err(TcfError::VendorZero);
            }
            if end < start {
                return Err(TcfError::Range(start, end));
            }
            if max.is_some_and(|m| end > m) {
                return Err(TcfError::VendorAboveMax);
            }
            set.insert_range(start, end);
        }
        Ok(())
    }

    /// A vendor section: `MaxVendorId`, `IsRangeEncoding`, then a bitfield or ranges.
    fn vendor_section(&mut self, field: &'static str) -> Result<VendorSet, TcfError> {
        let max = self.read(16, field)? as u16;
        if self.flag(field)? {
            let mut set = VendorSet::default();
            self.ranges(Some(max), field, &mut set)?;
            Ok(set)
        } else {
            let mut set = VendorSet::default();
            for id in 1..=max {
                if self.flag(field)? {
                    set.insert(id);
                }
            }
            Ok(set)
        }
    }
}

fn decode_segment(index: usize, text: &str) -> Result<Vec<u8>, TcfError> {
    TC_BASE64.decode(text).map_err(|_| TcfError::Base64(index))
}

/// Decodes a TC string.
pub fn decode(input: &str) -> Result<TcString, TcfError> {
    let input = input.trim();
    if input.is_empty() {
        return Err(TcfError::Empty);
    }
    if input.len() > MAX_TC_STRING_LEN {
        return Err(TcfError::TooLong);
    }
    let mut segments = input.split('.');
    let core = decode_segment(0, segments.next().unwrap_or_default())?;
    let mut b = Bits::new(&core);
    let version = b.read(6, "Version")?;
    if version != 2 {
        return Err(TcfError::Version(version));
    }
    let created_ds = b.read(36, "Created")?;
    let last_updated_ds = b.read(36, "LastUpdated")?;
    let cmp_id = b.read(12, "CmpId")? as u16;
    let cmp_version = b.read(12, "CmpVersion")? as u16;
    let consent_screen = b.read(6, "ConsentScreen")? as u8;
    let consent_language = b.letters("ConsentLanguage")?;
    let vendor_list_version = b.read(12, "VendorListVersion")? as u16;
    let policy_version = b.read(6, "TcfPolicyVersion")? as u8;
    let is_service_specific = b.flag("IsServiceSpecific")?;
    let use_non_standard_texts = b.flag("UseNonStandardTexts")?;
    let special_feature_opt_ins = b.id_set(12, "SpecialFeatureOptIns")?;
    let purposes_consent = b.id_set(24, "PurposesConsent")?;
    let purposes_li_transparency = b.id_set(24, "PurposesLITransparency")?;
    let purpose_one_treatment = b.flag("PurposeOneTreatment")?;
    let publisher_cc = b.letters("PublisherCC")?;
    let vendor_consents = b.vendor_section("VendorConsents")?;
    let vendor_legitimate_interests = b.vendor_section("VendorLegitimateInterests")?;
    let restrictions = b.read(12, "NumPubRestrictions")?;
    // Entries for the same purpose and type are merged, so a hostile string with thousands of
    // entries costs at most 24 purposes x 3 types vendor sets (8 KiB each at worst).
    let mut publisher_restrictions: Vec<PublisherRestriction> = Vec::new();
    for _ in 0..restrictions {
        let purpose = b.read(6, "PubRestrictionEntry")? as u8;
        if !(1..=24).contains(&purpose) {
            return Err(TcfError::Purpose(purpose));
        }
        let restriction = match b.read(2, "PubRestrictionEntry")? as u8 {
            0 => RestrictionType::NotAllowed,
            1 => RestrictionType::RequireConsent,
            2 => RestrictionType::RequireLegitimateInterest,
            other => return Err(TcfError::RestrictionType(other)),
        };
        let i = match publisher_restrictions
            .iter()
            .position(|r| r.purpose == purpose && r.restriction == restriction)
        {
            Some(i) => i,
            None => {
                publisher_restrictions.push(PublisherRestriction {
                    purpose,
                    restriction,
                    vendors: VendorSet::default(),
                });
                publisher_restrictions.len() - 1
            }
        };
        b.ranges(
            None,
            "PubRestrictionEntry",
            &mut publisher_restrictions[i].vendors,
        )?;
    }

    let mut disclosed_vendors = None;
    let mut publisher_tc = None;
    let mut seen = BTreeSet::new();
    for (i, text) in segments.enumerate() {
        let index = i + 1;
        let bytes = decode_segment(index, text)?;
        let mut s = Bits::new(&bytes);
        let kind = s.read(3, "SegmentType")?;
        if !seen.insert(kind) {
            return Err(TcfError::DuplicateSegment(kind));
        }
        match kind {
            1 => disclosed_vendors = Some(s.vendor_section("DisclosedVendors")?),
            // Allowed vendors: dropped from TCF 2.2; CMPs no longer write it. Skipped, not trusted.
            2 => {}
            3 => {
                let purposes_consent = s.id_set(24, "PubPurposesConsent")?;
                let purposes_li_transparency = s.id_set(24, "PubPurposesLITransparency")?;
                let custom = s.read(6, "NumCustomPurposes")? as usize;
                let custom_purposes_consent = s.id_set(custom, "CustomPurposesConsent")?;
                let custom_purposes_li_transparency =
                    s.id_set(custom, "CustomPurposesLITransparency")?;
                publisher_tc = Some(PublisherTc {
                    purposes_consent,
                    purposes_li_transparency,
                    custom_purposes_consent,
                    custom_purposes_li_transparency,
                });
            }
            other => return Err(TcfError::SegmentType(index, other)),
        }
    }

    Ok(TcString {
        version: version as u8,
        created_ds,
        last_updated_ds,
        cmp_id,
        cmp_version,
        consent_screen,
        consent_language,
        vendor_list_version,
        policy_version,
        is_service_specific,
        use_non_standard_texts,
        special_feature_opt_ins,
        purposes_consent,
        purposes_li_transparency,
        purpose_one_treatment,
        publisher_cc,
        vendor_consents,
        vendor_legitimate_interests,
        publisher_restrictions,
        disclosed_vendors,
        publisher_tc,
    })
}

/// Builders for TC strings in tests: fields written one by one, as the specification lists them.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// Writes fields MSB-first, the way the specification lays them out, so tests can build
    /// strings field by field and read as documentation of the format.
    #[derive(Default)]
    pub(crate) struct Writer {
        bits: Vec<bool>,
    }

    impl Writer {
        pub(crate) fn put(&mut self, width: usize, value: u64) -> &mut Self {
            for i in (0..width).rev() {
                self.bits.push((value >> i) & 1 == 1);
            }
            self
        }
        pub(crate) fn ids(&mut self, width: usize, ids: &[u64]) -> &mut Self {
            for id in 1..=width as u64 {
                self.bits.push(ids.contains(&id));
            }
            self
        }
        /// A writer holding every core field before the vendor sections, all zero but the
        /// version (2) and policy version (4).
        pub(crate) fn core_fields() -> Writer {
            let mut w = Writer::default();
            w.put(6, 2)
                .put(36, 0)
                .put(36, 0)
                .put(12, 0)
                .put(12, 0)
                .put(6, 0)
                .put(12, 0);
            w.put(12, 0)
                .put(6, 4)
                .put(2, 0)
                .put(12, 0)
                .put(24, 0)
                .put(24, 0)
                .put(1, 0)
                .put(12, 0);
            w
        }

        pub(crate) fn finish(&self) -> String {
            let mut bytes = vec![0u8; self.bits.len().div_ceil(8)];
            for (i, bit) in self.bits.iter().enumerate() {
                if *bit {
                    bytes[i / 8] |= 1 << (7 - i % 8);
                }
            }
            TC_BASE64.encode(bytes)
        }
    }

    /// A core-segment-only string: purposes consented, vendors consented (bitfield), vendors
    /// 10 and 700-800 with legitimate interest (ranges), and `(purpose, type, vendor)`
    /// publisher restrictions.
    pub(crate) fn tc_string(
        purposes: &[u64],
        vendors: &[u64],
        restrictions: &[(u64, u64, u64)],
    ) -> String {
        let mut w = Writer::default();
        w.put(6, 2)
            .put(36, 17_000_000_000)
            .put(36, 17_000_000_001)
            .put(12, 7)
            .put(12, 3)
            .put(6, 1)
            .put(6, 4)
            .put(6, 13) // "EN"
            .put(12, 150)
            .put(6, 4)
            .put(1, 1)
            .put(1, 0)
            .ids(12, &[1])
            .ids(24, purposes)
            .ids(24, &[2, 7])
            .put(1, 0)
            .put(6, 3)
            .put(6, 4); // "DE"
        let max = vendors.iter().copied().max().unwrap_or(0);
        // Consents as a bitfield, legitimate interests as ranges.
        w.put(16, max).put(1, 0).ids(max as usize, vendors);
        w.put(16, 800).put(1, 1).put(12, 2);
        w.put(1, 0).put(16, 10);
        w.put(1, 1).put(16, 700).put(16, 800);
        w.put(12, restrictions.len() as u64);
        for (purpose, kind, vendor) in restrictions {
            w.put(6, *purpose)
                .put(2, *kind)
                .put(12, 1)
                .put(1, 0)
                .put(16, *vendor);
        }
        w.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::{Writer, tc_string as core};
    use super::*;

    #[test]
    fn decodes_every_core_field() {
        let s = core(&[1, 7, 8, 9], &[3, 755], &[(7, 0, 755), (8, 2, 4)]);
        let tc = decode(&s).unwrap();
        assert_eq!(tc.version, 2);
        assert_eq!(tc.created_ds, 17_000_000_000);
        assert_eq!(tc.last_updated_ds, 17_000_000_001);
        assert_eq!((tc.cmp_id, tc.cmp_version, tc.consent_screen), (7, 3, 1));
        assert_eq!(tc.consent_language, "EN");
        assert_eq!(tc.publisher_cc, "DE");
        assert_eq!(tc.vendor_list_version, 150);
        assert_eq!(tc.policy_version, 4);
        assert!(tc.is_service_specific && !tc.use_non_standard_texts && !tc.purpose_one_treatment);
        assert_eq!(tc.special_feature_opt_ins, BTreeSet::from([1]));
        assert_eq!(tc.purposes_consent, BTreeSet::from([1, 7, 8, 9]));
        assert_eq!(tc.purposes_li_transparency, BTreeSet::from([2, 7]));
        assert_eq!(tc.vendor_consents, VendorSet::from([3, 755]));
        assert_eq!(tc.vendor_legitimate_interests.len(), 102);
        assert!(tc.vendor_legitimate_interests.contains(10));
        assert!(tc.vendor_legitimate_interests.contains(755));
        assert_eq!(tc.restriction(7, 755), Some(RestrictionType::NotAllowed));
        assert_eq!(
            tc.restriction(8, 4),
            Some(RestrictionType::RequireLegitimateInterest)
        );
        assert_eq!(tc.restriction(8, 755), None);
        assert_eq!(tc.disclosed_vendors, None);
    }

    #[test]
    fn decodes_disclosed_vendors_and_publisher_tc_segments() {
        let base = core(&[1], &[1], &[]);
        let mut disclosed = Writer::default();
        disclosed
            .put(3, 1)
            .put(16, 12)
            .put(1, 1)
            .put(12, 1)
            .put(1, 1)
            .put(16, 5)
            .put(16, 7);
        let mut publisher = Writer::default();
        publisher
            .put(3, 3)
            .ids(24, &[1, 3])
            .ids(24, &[2])
            .put(6, 2)
            .ids(2, &[2])
            .ids(2, &[1]);
        let s = format!("{base}.{}.{}", disclosed.finish(), publisher.finish());
        let tc = decode(&s).unwrap();
        assert_eq!(tc.disclosed_vendors, Some(VendorSet::from([5, 6, 7])));
        let p = tc.publisher_tc.unwrap();
        assert_eq!(p.purposes_consent, BTreeSet::from([1, 3]));
        assert_eq!(p.purposes_li_transparency, BTreeSet::from([2]));
        assert_eq!(p.custom_purposes_consent, BTreeSet::from([2]));
        assert_eq!(p.custom_purposes_li_transparency, BTreeSet::from([1]));
    }

    #[test]
    fn malformed_strings_are_errors() {
        let good = core(&[1], &[1], &[]);
        assert_eq!(decode(""), Err(TcfError::Empty));
        assert_eq!(decode("!!!"), Err(TcfError::Base64(0)));
        assert!(matches!(decode(&good[..10]), Err(TcfError::Truncated(_))));
        assert_eq!(decode(&format!("{good}.%%")), Err(TcfError::Base64(1)));
        let mut v1 = Writer::default();
        v1.put(6, 1).put(64, 0);
        assert_eq!(decode(&v1.finish()), Err(TcfError::Version(1)));
        let mut unknown = Writer::default();
        unknown.put(3, 5).put(5, 0);
        assert_eq!(
            decode(&format!("{good}.{}", unknown.finish())),
            Err(TcfError::SegmentType(1, 5))
        );
        assert_eq!(
            decode(&"A".repeat(MAX_TC_STRING_LEN + 1)),
            Err(TcfError::TooLong)
        );
    }

    #[test]
    fn restriction_entries_are_merged_by_purpose_and_type() {
        // 1,500 entries for one purpose and type, each a full range: one merged set.
        let mut w = Writer::core_fields();
        w.put(16, 0).put(1, 0).put(16, 0).put(1, 0);
        w.put(12, 1500);
        for _ in 0..1500 {
            w.put(6, 7)
                .put(2, 0)
                .put(12, 1)
                .put(1, 1)
                .put(16, 1)
                .put(16, 65_535);
        }
        let tc = decode(&w.finish()).unwrap();
        assert_eq!(tc.publisher_restrictions.len(), 1);
        assert_eq!(tc.publisher_restrictions[0].vendors.len(), 65_535);
        let mut zero = Writer::core_fields();
        zero.put(16, 0).put(1, 0).put(16, 0).put(1, 0);
        zero.put(12, 1).put(6, 0).put(2, 0).put(12, 0);
        assert_eq!(decode(&zero.finish()), Err(TcfError::Purpose(0)));
    }

    #[test]
    fn vendor_set_ranges_cross_word_boundaries() {
        let mut set = VendorSet::default();
        set.insert_range(60, 130);
        set.insert(65_535);
        assert_eq!(set.len(), 72);
        assert!(set.contains(60) && set.contains(64) && set.contains(128) && set.contains(130));
        assert!(!set.contains(59) && !set.contains(131) && !set.contains(1000));
        assert!(set.contains(65_535));
        assert_eq!(set.iter().next(), Some(60));
    }

    #[test]
    fn hostile_wide_ranges_are_cheap() {
        // 2,000 entries each covering 1..=65,535: bounded work, one full set.
        let mut w = Writer::core_fields();
        w.put(16, 65_535).put(1, 1).put(12, 2000);
        for _ in 0..2000 {
            w.put(1, 1).put(16, 1).put(16, 65_535);
        }
        w.put(16, 0).put(1, 0).put(12, 0);
        let tc = decode(&w.finish()).unwrap();
        assert_eq!(tc.vendor_consents.len(), 65_535);
    }

    proptest::proptest! {
        /// Arbitrary input never panics; this is also what the fuzz target exercises.
        #[test]
        fn arbitrary_input_never_panics(s in "[A-Za-z0-9_.=-]{0,400}") {
            let _ = decode(&s);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = decode(&TC_BASE64.encode(bytes));
        }
    }
}
