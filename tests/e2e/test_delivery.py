"""End-to-end: events sent by the real Segment Python SDK reach four local vendors, each in its
own wire format, through Handoff's policy and delivery.

- a webhook receiver that verifies Handoff's signatures with the official Standard Webhooks
  library (`standardwebhooks`);
- fakes of Meta's Conversions API and GA4's Measurement Protocol that record what arrives;
- `localstripe`, a fake Stripe server, where the identify becomes a customer read back through
  its API.
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

import pytest
import requests
import segment.analytics as analytics
from standardwebhooks.webhooks import Webhook

from test_sdks import BIN

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
KEY = "delivery-e2e-key-0123456789"
STRIPE_KEY = "sk_test_e2e0123456789"


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
    stripe = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "localstripe"), "--port", str(stripe_port)],
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
settings = {{ measurement_id = "G-E2E", api_secret = "ga4secret" }}

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
        yield {"url": url, **vendors}
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
        r = requests.get(gateway["stripe"] + "/v1/customers", auth=(STRIPE_KEY, ""), timeout=5).json()
        return [c for c in r.get("data", []) if c.get("email") == "Jane.Doe@example.org"]

    found = wait_for("a Stripe customer", customers)
    assert found[0]["name"] == "Jane Doe"
    assert found[0]["metadata"] == {"handoff_user_id": "user-7"}
