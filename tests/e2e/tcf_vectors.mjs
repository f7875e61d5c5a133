// Generates TC strings with the IAB's reference encoder (@iabtcf/core) and prints, one JSON line
// each, the string and what the reference decoder reads back from it, in the field names of
// `handoff consent decode`. Usage: node tcf_vectors.mjs COUNT SEED
import { GVL, TCModel, TCString, PurposeRestriction, RestrictionType, Segment } from '@iabtcf/core';

const count = Number(process.argv[2] ?? 200);
let seed = Number(process.argv[3] ?? 1) >>> 0;
// mulberry32: a small seeded generator, so a failing case can be reproduced by its seed.
function rand() {
  seed = (seed + 0x6d2b79f5) >>> 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const pick = (n) => Math.floor(rand() * n);
const subset = (ids, p) => ids.filter(() => rand() < p);
const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

// A synthetic Global Vendor List: the encoder only keeps vendors the GVL declares, with the
// legal bases they declare. Sparse and dense id ranges make the encoder choose both the
// bitfield and the range encodings.
function gvlJson() {
  const vendorIds = [...range(1, 40), ...subset(range(41, 1200), 0.15), 755];
  const vendors = {};
  for (const id of new Set(vendorIds)) {
    const purposes = subset(range(1, 11), 0.6);
    const legIntPurposes = subset(range(2, 11).filter((p) => !purposes.includes(p)), 0.5);
    const flexiblePurposes = [...purposes, ...legIntPurposes].filter((p) => p !== 1 && rand() < 0.5);
    vendors[id] = {
      id, name: `Vendor ${id}`, purposes, legIntPurposes, flexiblePurposes,
      specialPurposes: [1], features: [], specialFeatures: subset([1, 2], 0.5),
      policyUrl: 'https://vendor.example/privacy', cookieMaxAgeSeconds: 86400, usesCookies: true,
      cookieRefresh: false, usesNonCookieAccess: false, dataRetention: { stdRetention: 30 },
      dataDeclaration: [1], urls: [],
    };
  }
  const named = (ids) => Object.fromEntries(ids.map((id) => [id, { id, name: `P${id}`, description: '' }]));
  return {
    gvlSpecificationVersion: 3, vendorListVersion: 1 + pick(300), tcfPolicyVersion: 4,
    lastUpdated: '2026-11-01T00:00:00Z', purposes: named(range(1, 11)), specialPurposes: named([1, 2, 3]),
    features: named([1, 2, 3]), specialFeatures: named([1, 2]), stacks: {}, dataCategories: {}, vendors,
  };
}

const ids = (vector) => { const out = []; vector.forEach((v, id) => { if (v) out.push(id); }); return out.sort((a, b) => a - b); };
const ds = (date) => Math.round(date.getTime() / 100);

for (let i = 0; i < count; i++) {
  const gvl = new GVL(gvlJson());
  const model = new TCModel(gvl);
  model.cmpId = 2 + pick(4000);
  model.cmpVersion = pick(4000);
  model.consentScreen = pick(64);
  model.publisherCountryCode = ['DE', 'FR', 'GB', 'US', 'AA'][pick(5)];
  model.isServiceSpecific = rand() < 0.7;
  model.useNonStandardStacks = rand() < 0.3;
  model.purposeOneTreatment = rand() < 0.2;
  const vendorIds = Object.keys(gvl.vendors).map(Number);
  const p = [0.05, 0.5, 0.95][pick(3)];
  model.purposeConsents.set(subset(range(1, 11), p));
  model.purposeLegitimateInterests.set(subset(range(2, 11), p));
  model.specialFeatureOptins.set(subset([1, 2], p));
  model.vendorConsents.set(subset(vendorIds, p));
  model.vendorLegitimateInterests.set(subset(vendorIds, p));
  for (let r = pick(4); r > 0; r--) {
    const vendor = vendorIds[pick(vendorIds.length)];
    const purpose = 2 + pick(10);
    const type = [RestrictionType.NOT_ALLOWED, RestrictionType.REQUIRE_CONSENT, RestrictionType.REQUIRE_LI][pick(3)];
    model.publisherRestrictions.add(vendor, new PurposeRestriction(purpose, type));
  }
  model.publisherConsents.set(subset(range(1, 11), 0.5));
  model.publisherLegitimateInterests.set(subset(range(2, 11), 0.5));
  model.numCustomPurposes = pick(5);
  model.publisherCustomConsents.set(subset(range(1, model.numCustomPurposes), 0.5));
  model.publisherCustomLegitimateInterests.set(subset(range(1, model.numCustomPurposes), 0.5));

  const withDisclosed = rand() < 0.5;
  const withPublisher = rand() < 0.5;
  const segments = [Segment.CORE];
  if (withDisclosed) segments.push(Segment.VENDORS_DISCLOSED);
  if (withPublisher) segments.push(Segment.PUBLISHER_TC);
  const tc = TCString.encode(model, { segments });

  const d = TCString.decode(tc);
  const restrictions = [];
  for (const pr of d.publisherRestrictions.getRestrictions()) {
    restrictions.push({ purpose: pr.purposeId, restriction: pr.restrictionType, vendors: d.publisherRestrictions.getVendors(pr).sort((a, b) => a - b) });
  }
  restrictions.sort((a, b) => a.purpose - b.purpose || a.restriction - b.restriction);
  const expected = {
    version: d.version,
    created_ds: ds(d.created),
    last_updated_ds: ds(d.lastUpdated),
    cmp_id: d.cmpId,
    cmp_version: d.cmpVersion,
    consent_screen: d.consentScreen,
    consent_language: d.consentLanguage,
    vendor_list_version: d.vendorListVersion,
    policy_version: d.policyVersion,
    is_service_specific: d.isServiceSpecific,
    use_non_standard_texts: d.useNonStandardStacks,
    special_feature_opt_ins: ids(d.specialFeatureOptins),
    purposes_consent: ids(d.purposeConsents),
    purposes_li_transparency: ids(d.purposeLegitimateInterests),
    purpose_one_treatment: d.purposeOneTreatment,
    publisher_cc: d.publisherCountryCode,
    vendor_consents: ids(d.vendorConsents),
    vendor_legitimate_interests: ids(d.vendorLegitimateInterests),
    publisher_restrictions: restrictions,
    disclosed_vendors: withDisclosed ? ids(d.vendorsDisclosed) : null,
    publisher_tc: withPublisher ? {
      purposes_consent: ids(d.publisherConsents),
      purposes_li_transparency: ids(d.publisherLegitimateInterests),
      custom_purposes_consent: ids(d.publisherCustomConsents),
      custom_purposes_li_transparency: ids(d.publisherCustomLegitimateInterests),
    } : null,
  };
  process.stdout.write(JSON.stringify({ tc, expected }) + '\n');
}
