"""End-to-end: events sent by the real Segment Python SDK reach four local vendors, each in its
own wire format, through Handoff's policy and delivery.

- a webhook receiver that verifies Handoff's signatures with the official Standard Webhooks
  library (`standardwebhooks`);
- fakes of Meta's Conversions API and GA4's Measurement Protocol that record what arrives;
- `localstripe`, a fake Stripe server, where the identify becomes a customer read back through
  its API (and a later identify updates it).

Then the same person asks to be erased: each vendor receives its own deletion (a signed
`subject.erasure` webhook, GA4's User Deletion API, Stripe's customer delete: localstripe's
customer is gone; Meta as a manual task an operator confirms); the journal holds nothing of them;
their new events are blocked as `subject.suppressed`; the ledger tells the story and
`handoff audit verify` passes, and fails once the ledger is tampered with.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import sqlite3

import pytest
import requests
import segment.analytics as analytics
from standardwebhooks.webhooks import Webhook

from test_sdks import BIN

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
KEY = "delivery-e2e-key-0123456789"
STRIPE_KEY = "sk_test_e2e0123456789"


LOCALSTRIPE_IN_MEMORY = """
import sys
import localstripe.resources
from localstripe.server import start
localstripe.resources.Store.dump_to_disk = lambda self: None
sys.argv[0] = "localstripe"
start()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder(BaseHTTPRequestHandler):
    received = []  # (path, headers, body)

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        Recorder.received.append((self.path, dict(self.headers), body))
        self.send_response(204 if self.path == "/hook" else 200)
        self.end_headers()
        if self.path != "/hook":
            self.wfile.write(b'{"events_received": 1}')

    def log_message(self, *args):
        pass


@pytest.fixture()
def vendors():
    Recorder.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stripe_port = free_port()
    # localstripe keeps its customers in /tmp/localstripe.pickle and loads them at start: each
    # test gets an empty one that keeps nothing on disk (a stale list of customers from an
    # earlier run pushed this test's customer off the first page of /v1/customers).
    stripe = subprocess.Popen(
        [sys.executable, "-c", LOCALSTRIPE_IN_MEMORY, "--from-scratch", "--port", str(stripe_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    stripe_url = f"http://127.0.0.1:{stripe_port}"
    deadline = time.time() + 30
    while True:
        try:
            requests.get(stripe_url + "/v1/customers", auth=(STRIPE_KEY, ""), timeout=1)
            break
        except requests.ConnectionError:
            assert time.time() < deadline, "localstripe did not start"
            time.sleep(0.1)
    try:
        yield {"recorder": f"http://127.0.0.1:{server.server_address[1]}", "stripe": stripe_url}
    finally:
        server.shutdown()
        stripe.terminate()
        stripe.wait(timeout=10)


def config(v):
    today = time.strftime("%Y-%m-%d", time.gmtime())
    return f"""
[[sources]]
id = "web"
write_key = "{KEY}"

[delivery]
retry_base_ms = 50
retry_max_ms = 500

[[vendors]]
id = "v"
legal_name = "Local vendors"
country = "IE"
dpa_signed = 2025-01-01
last_assessment = {today}
risk_tier = "low"
transfer_mechanism = "adequacy"

[[destinations]]
id = "crm-webhook"
vendor = "v"
connector = "webhook"
purposes = ["support"]
legal_basis = "legitimate_interest"
event_types = ["identify", "track"]
allow = ["userId", "event", "traits.email", "properties.order_id"]
pii_expected = ["traits.email"]
endpoint = "{v['recorder']}/hook"
settings = {{ secret = "{SECRET}" }}

[[destinations]]
id = "meta-capi"
vendor = "v"
connector = "meta_capi"
purposes = ["advertising"]
legal_basis = "consent"
consent = {{ categories = ["advertising"] }}
event_types = ["track"]
allow = ["event", "properties.value", "properties.currency", "context.ip", "context.userAgent", "context.traits.email"]
transforms = [{{ op = "hash", field = "context.traits.email", normalize = "email" }}]
endpoint = "{v['recorder']}"
settings = {{ pixel_id = "1234567890", access_token = "EAAe2etoken" }}

[[destinations]]
id = "ga4"
vendor = "v"
connector = "ga4"
purposes = ["analytics"]
legal_basis = "consent"
consent = {{ categories = ["analytics"] }}
event_types = ["track"]
allow = ["event", "anonymousId", "properties.*"]
endpoint = "{v['recorder']}"
settings = {{ measurement_id = "G-E2E", api_secret = "ga4secret", property_id = "424242", deletion_access_token = "ya29.e2e", deletion_endpoint = "{v['recorder']}/deletion" }}

[[destinations]]
id = "stripe"
vendor = "v"
connector = "stripe"
purposes = ["payments"]
legal_basis = "contract"
event_types = ["identify"]
allow = ["userId", "traits.email", "traits.name"]
pii_expected = ["traits.email"]
endpoint = "{v['stripe']}"
settings = {{ api_key = "{STRIPE_KEY}" }}
"""


@pytest.fixture()
def gateway(tmp_path, vendors):
    path = tmp_path / "handoff.toml"
    path.write_text(config(vendors))
    proc = subprocess.Popen(
        [BIN, "serve", "--listen", "127.0.0.1:0", "--config", str(path), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "RUST_LOG": "warn"},
    )
    url = None
    try:
        for line in proc.stdout:
            if line.startswith("listening on "):
                url = line.split()[-1]
                break
        assert url, "handoff did not start"
        yield {"url": url, "data": str(tmp_path / "data"), **vendors}
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def wait_for(what, check, timeout=30):
    deadline = time.time() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stripe_customers(gateway, email):
    """The customers localstripe holds with this e-mail (Stripe's list filter, one full page)."""
    r = requests.get(gateway["stripe"] + "/v1/customers", params={"email": email, "limit": 100},
                     auth=(STRIPE_KEY, ""), timeout=5)
    r.raise_for_status()
    return [c for c in r.json()["data"] if c.get("email") == email]


def test_sdk_events_reach_each_vendor_in_its_own_format(gateway):
    client = analytics.Client(KEY, host=gateway["url"], sync_mode=True)
    consent = {"consent": {"categoryPreferences": {"Advertising": True, "Analytics": True}}}
    client.identify("user-7", {"email": "Jane.Doe@example.org", "name": "Jane Doe", "plan": "pro"})
    client.track("user-7", "Order Completed", {"order_id": "o-42", "value": 25.5, "currency": "EUR"},
                 context={**consent, "ip": "203.0.113.7", "userAgent": "e2e", "traits": {"email": "Jane.Doe@example.org"}},
                 anonymous_id="anon-7")
    client.flush()

    def at(path_prefix):
        return [r for r in Recorder.received if r[0].startswith(path_prefix)]

    # The webhook: two signed deliveries that the official library verifies.
    hooks = wait_for("two webhooks", lambda: len(at("/hook")) >= 2 and at("/hook"))
    verifier = Webhook(SECRET)
    kinds = set()
    for _, headers, body in hooks:
        lowered = {k.lower(): v for k, v in headers.items()}
        payload = verifier.verify(body, lowered)
        kinds.add(payload["type"])
        assert "plan" not in json.dumps(payload), "not in the allowlist"
    assert kinds == {"event.identify", "event.track"}
    tampered = {k.lower(): v for k, v in hooks[0][1].items()}
    with pytest.raises(Exception):
        verifier.verify(hooks[0][2] + b" ", tampered)

    # Meta: a Purchase with the e-mail hashed per Meta's rules, token in the body.
    meta = wait_for("Meta", lambda: at("/v21.0/1234567890/events"))
    body = json.loads(meta[0][2])
    event = body["data"][0]
    assert body["access_token"] == "EAAe2etoken"
    assert event["event_name"] == "Purchase" and event["action_source"] == "website"
    assert event["user_data"]["em"] == [hashlib.sha256(b"jane.doe@example.org").hexdigest()]
    assert event["user_data"]["client_ip_address"] == "203.0.113.7"
    # order_id is not in meta-capi's allowlist, so Meta does not get it.
    assert event["custom_data"] == {"value": 25.5, "currency": "EUR"}

    # GA4: a purchase for the client id, secrets in the query as the protocol wants.
    ga = wait_for("GA4", lambda: at("/mp/collect"))
    assert "measurement_id=G-E2E" in ga[0][0] and "api_secret=ga4secret" in ga[0][0]
    body = json.loads(ga[0][2])
    assert body["client_id"] == "anon-7"
    assert body["events"][0]["name"] == "purchase"
    assert body["events"][0]["params"]["transaction_id"] == "o-42"

    # Stripe: the identify became a customer, read back through localstripe.
    def customers():
        return stripe_customers(gateway, "Jane.Doe@example.org")

    found = wait_for("a Stripe customer", customers)
    assert found[0]["name"] == "Jane Doe"
    assert found[0]["metadata"] == {"handoff_user_id": "user-7"}


def cli(data, *args):
    return subprocess.run([BIN, *args, "--data-dir", data], capture_output=True, text=True)


def test_a_later_identify_updates_the_customer_and_erasure_reaches_every_vendor(gateway):
    client = analytics.Client(KEY, host=gateway["url"], sync_mode=True)
    consent = {"consent": {"categoryPreferences": {"Advertising": True, "Analytics": True}}}
    client.identify("user-9", {"email": "sam@example.org", "name": "Sam"})
    client.track("user-9", "Order Completed", {"order_id": "o-9", "value": 9, "currency": "EUR"},
                 context={**consent, "traits": {"email": "sam@example.org"}}, anonymous_id="anon-9")
    client.flush()

    def customers():
        return stripe_customers(gateway, "sam@example.org")

    first = wait_for("Sam's customer", customers)
    client.identify("user-9", {"email": "sam@example.org", "name": "Sam Smith"})
    client.flush()
    updated = wait_for("the name updated", lambda: [c for c in customers() if c["name"] == "Sam Smith"])
    assert len(customers()) == 1 and updated[0]["id"] == first[0]["id"], "updated, not created again"
    wait_for("Meta and GA4", lambda: any(p.startswith("/mp/collect") for p, _, _ in Recorder.received)
             and any(p.startswith("/v21.0/") for p, _, _ in Recorder.received))

    # Sam asks to be erased (a privacy client's token, as a DPO's tool would hold).
    created = subprocess.run([BIN, "clients", "create", "--name", "dpo", "--role", "privacy", "--format", "json",
                              "--data-dir", gateway["data"]], capture_output=True, text=True, check=True)
    creds = json.loads(created.stdout)
    token = requests.post(gateway["url"] + "/oauth/token", auth=(creds["client_id"], creds["client_secret"]),
                          data={"grant_type": "client_credentials"}, timeout=5).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    r = requests.post(gateway["url"] + "/v1/dsr", json={"type": "erasure", "userId": "user-9",
                      "anonymousId": "anon-9", "email": "sam@example.org"}, headers=auth, timeout=5)
    assert r.status_code == 201, r.text
    dsr = r.json()
    tasks = {t["destination"]: t for t in dsr["tasks"]}
    assert set(tasks) == {"crm-webhook", "meta-capi", "ga4", "stripe"}
    assert tasks["meta-capi"]["status"] == "manual" and "Conversions API" in tasks["meta-capi"]["instructions"]

    def status():
        return requests.get(gateway["url"] + f"/v1/dsr/{dsr['id']}", headers=auth, timeout=5).json()

    wait_for("the API vendors confirmed",
             lambda: all(t["status"] == "done" for t in status()["tasks"] if t["destination"] != "meta-capi"))
    # Stripe: the customer is gone.
    gone = requests.get(gateway["stripe"] + f"/v1/customers/{first[0]['id']}", auth=(STRIPE_KEY, ""), timeout=5)
    assert gone.status_code == 404
    # The webhook: a signed subject.erasure the official library verifies.
    erasures = [(h, b) for p, h, b in Recorder.received if p == "/hook" and b"subject.erasure" in b]
    assert len(erasures) == 1
    payload = Webhook(SECRET).verify(erasures[0][1], {k.lower(): v for k, v in erasures[0][0].items()})
    assert payload["data"]["userIds"] == ["user-9"] and payload["data"]["dsrId"] == dsr["id"]
    # GA4: the User Deletion API with its OAuth token, for the id GA4 was sent: this destination
    # allows anonymousId (its client_id), not userId, so GA4 is asked about the client id only.
    deletions = [(h, json.loads(b)) for p, h, b in Recorder.received if p == "/deletion"]
    assert [(d["id"]["type"], d["id"]["userId"]) for _, d in deletions] == [("CLIENT_ID", "anon-9")]
    assert all(d["propertyId"] == "424242" and {k.lower(): v for k, v in h.items()}["authorization"] == "Bearer ya29.e2e"
               for h, d in deletions)
    assert status()["status"] == "open", "Meta is still to be done by hand"
    # The manual task says what to quote: the e-mail's SHA-256, as Meta received it as `em`.
    meta = [t for t in status()["tasks"] if t["destination"] == "meta-capi"][0]
    assert hashlib.sha256(b"sam@example.org").hexdigest() in meta["quote"], meta
    assert "sam@example.org" not in meta["instructions"] and "@" not in meta["quote"]
    done = cli(gateway["data"], "dsr", "confirm", dsr["id"], "meta-capi", "--note", "Meta ticket 4711")
    assert done.returncode == 0, done.stderr
    assert status()["status"] == "completed"
    again = cli(gateway["data"], "dsr", "confirm", dsr["id"], "meta-capi")
    assert again.returncode == 0 and "already done" in again.stderr, again.stderr

    # Nothing of Sam is left in the journal; a new event of theirs is blocked and not kept.
    client.track("user-9", "Came Back", {}, context=consent)
    client.flush()
    wait_for("the new event blocked", lambda: '"subject.suppressed"' in
             cli(gateway["data"], "report", "subject", "--email", "sam@example.org").stdout)
    dump = cli(gateway["data"], "journal", "dump").stdout
    assert dump.count('"erased":true') >= 4 and "sam@example.org" not in dump and '"user-9"' not in dump
    db = sqlite3.connect(os.path.join(gateway["data"], "outbox.db"))
    subject = dsr["subject"]
    assert db.execute("SELECT count(*) FROM outbox WHERE subject = ?", (subject,)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM dead_letters WHERE subject = ?", (subject,)).fetchone()[0] == 0

    # The ledger tells the story, and verifies; tampered, it does not.
    story = json.loads(cli(gateway["data"], "report", "subject", "--id", subject).stdout)
    outcomes = [(e["kind"], e["outcome"]) for e in story["entries"]]
    # A handoff's record carries its decision (reasons, fields), so a delivered event has no
    # separate "send" decision.
    for step in [("delivery", "delivered"), ("dsr", "erasure.filed"),
                 ("dsr", "erasure.confirmed"), ("decision", "block")]:
        assert step in outcomes, step
    assert any("Meta ticket 4711" in e["detail"] for e in story["entries"]), "the operator's note is in the ledger"
    # What each vendor was sent about Sam was kept only until it confirmed the deletion.
    assert db.execute("SELECT count(*) FROM sent_identifiers WHERE subject = ?", (subject,)).fetchone()[0] == 0
    ok = cli(gateway["data"], "audit", "verify")
    assert ok.returncode == 0 and ok.stdout.startswith("ledger intact"), ok.stdout + ok.stderr
    db.execute("DELETE FROM ledger WHERE seq = 2")
    db.commit()
    db.close()
    bad = cli(gateway["data"], "audit", "verify")
    assert bad.returncode == 1 and "NOT intact at entry 2" in bad.stdout, bad.stdout
