"""TC strings made by the IAB's reference encoder (@iabtcf/core) decode identically with ours.

`tcf_vectors.mjs` builds random consent states (purposes, special features, vendor consents and
legitimate interests over sparse and dense vendor ids so both the bitfield and the range encodings
occur, publisher restrictions, the disclosed-vendors and publisher-TC segments), encodes them with
the reference encoder, and reads them back with the reference decoder. `handoff consent decode`
must read every field the same way.
"""

import json
import os
import subprocess

from test_sdks import BIN

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = (1, 2, 3)
PER_SEED = 150


def reference_vectors(seed):
    out = subprocess.run(["node", os.path.join(HERE, "tcf_vectors.mjs"), str(PER_SEED), str(seed)],
                         check=True, capture_output=True, text=True, cwd=HERE).stdout
    return [json.loads(line) for line in out.splitlines()]


def merged_restrictions(entries):
    """Entries for the same purpose and type merged, as the reference model stores them."""
    merged = {}
    for e in entries:
        merged.setdefault((e["purpose"], e["restriction"]), set()).update(e["vendors"])
    return [{"purpose": p, "restriction": t, "vendors": sorted(v)} for (p, t), v in sorted(merged.items())]


def test_reference_encoder_strings_decode_identically():
    checked = 0
    encodings = set()
    for seed in SEEDS:
        vectors = reference_vectors(seed)
        assert len(vectors) == PER_SEED
        result = subprocess.run([BIN, "consent", "decode"], input="\n".join(v["tc"] for v in vectors),
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr
        ours = [json.loads(line) for line in result.stdout.splitlines()]
        assert len(ours) == len(vectors)
        for v, got in zip(vectors, ours):
            expected = v["expected"]
            got["publisher_restrictions"] = merged_restrictions(got["publisher_restrictions"])
            assert set(got) == set(expected), (v["tc"], set(got) ^ set(expected))
            for key, want in expected.items():
                assert got[key] == want, f"seed {seed}: {key} differs for {v['tc']}"
            checked += 1
            encodings.add(len(v["tc"].split(".")))
    assert checked == len(SEEDS) * PER_SEED
    assert encodings == {1, 2, 3}, "every segment combination was exercised"


def test_malformed_strings_are_reported_not_guessed():
    result = subprocess.run([BIN, "consent", "decode", "not-a-tc-string", "CAAAAAAAAAAA"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["error"]["code"] for line in lines] == ["consent.tcf.malformed"] * 2
