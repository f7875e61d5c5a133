"""End-to-end: the real Segment and RudderStack client libraries against `handoff serve`.

Each test sends events with an SDK, then reads the journal with `handoff journal dump` and checks
that it holds exactly those events (no more, no fewer) with the fields the SDK sent.
"""

import json
import os
import queue
import subprocess
import threading
import uuid

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.environ.get("HANDOFF_BIN", os.path.join(HERE, "..", "..", "target", "debug", "handoff"))

KEYS = {
    "py-segment": "segment-python-key-0123456789",
    "py-rudder": "rudder-python-key-0123456789",
    "node-segment": "segment-node-key-0123456789",
}


@pytest.fixture()
def gateway(tmp_path):
    config = tmp_path / "handoff.toml"
    config.write_text(
        "".join(f'[[sources]]\nid = "{sid}"\nwrite_key = "{key}"\n\n' for sid, key in KEYS.items())
    )
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [BIN, "serve", "--listen", "127.0.0.1:0", "--config", str(config), "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "RUST_LOG": "warn"},
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True).start()
    url = None
    try:
        while url is None:
            line = lines.get(timeout=30)
            if line.startswith("listening on "):
                url = line.split()[-1]
        yield {"url": url, "data_dir": str(data_dir)}
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, "handoff exits cleanly on SIGTERM"


def journal(gw, source):
    out = subprocess.run(
        [BIN, "journal", "dump", "--data-dir", gw["data_dir"]], check=True, capture_output=True, text=True
    ).stdout
    return [json.loads(l) for l in out.splitlines() if json.loads(l)["source"] == source]


def metric(gw, name):
    """A sample from /metrics, scraped as Prometheus would: with a monitor client's token."""
    import requests

    if "monitor" not in gw:
        out = subprocess.run(
            [BIN, "clients", "create", "--name", "prometheus", "--role", "monitor", "--format", "json",
             "--data-dir", gw["data_dir"]],
            check=True, capture_output=True, text=True,
        ).stdout
        creds = json.loads(out)
        gw["monitor"] = (creds["client_id"], creds["client_secret"])
    token = requests.post(gw["url"] + "/oauth/token", auth=gw["monitor"],
                          data={"grant_type": "client_credentials"}, timeout=10).json()["access_token"]
    body = requests.get(gw["url"] + "/metrics", headers={"Authorization": "Bearer " + token}, timeout=10).text
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def python_calls(prefix):
    """One call of each type, with the messageIds we expect to find stored."""
    ids = {k: f"{prefix}-{k}-{uuid.uuid4()}" for k in ("identify", "track", "page", "screen", "group", "alias")}
    calls = [
        ("identify", dict(user_id="py-user", traits={"plan": "pro", "age": 41}, message_id=ids["identify"])),
        ("track", dict(user_id="py-user", event="Order Completed",
                       properties={"order_id": "o-9", "total": 12.5, "items": [{"sku": "x"}]},
                       message_id=ids["track"])),
        ("page", dict(anonymous_id="py-anon", name="Home", properties={"path": "/"}, message_id=ids["page"])),
        ("screen", dict(user_id="py-user", name="Checkout", message_id=ids["screen"])),
        ("group", dict(user_id="py-user", group_id="acme", traits={"employees": 40}, message_id=ids["group"])),
        ("alias", dict(previous_id="py-anon", user_id="py-user", message_id=ids["alias"])),
    ]
    return calls


def check_python_events(stored, calls, library, identify_traits_in_context=False):
    """`identify_traits_in_context`: RudderStack's SDK sends identify traits as `context.traits`."""
    by_id = {e["messageId"]: e["event"] for e in stored}
    assert sorted(by_id) == sorted(kw["message_id"] for _, kw in calls), "exactly the events sent"
    assert len(stored) == len(calls)
    fields = {"user_id": "userId", "anonymous_id": "anonymousId", "event": "event", "properties": "properties",
              "traits": "traits", "name": "name", "group_id": "groupId", "previous_id": "previousId"}
    for kind, kw in calls:
        e = by_id[kw["message_id"]]
        assert e["type"] == kind
        for py, js in fields.items():
            if py in kw:
                where = e["context"] if (kind, py) == ("identify", "traits") and identify_traits_in_context else e
                assert where[js] == kw[py], (kind, js, e)
        assert e["context"]["library"]["name"] == library
        assert "originalTimestamp" in e and e["timestamp"] and e["receivedAt"]
        assert "writeKey" not in e


def send_with(client_class, source, gateway, **options):
    """Sends one call of each type with a Python SDK client; returns the calls made."""
    errors = []
    client = client_class(KEYS[source], host=gateway["url"], max_retries=0,
                          on_error=lambda e, batch: errors.append(repr(e)), **options)
    calls = python_calls(source)
    for kind, kw in calls:
        ok, _ = getattr(client, kind)(**kw)
        assert ok
    client.flush()
    client.shutdown()
    assert errors == []
    assert metric(gateway, f'handoff_events_accepted_total{{source="{source}"}}') == len(calls)
    return calls


@pytest.mark.parametrize("gzip", [False, True])
def test_segment_analytics_python(gateway, gzip):
    from segment.analytics import Client

    calls = send_with(Client, "py-segment", gateway, gzip=gzip)
    check_python_events(journal(gateway, "py-segment"), calls, "analytics-python")


def test_rudder_sdk_python(gateway):
    from rudderstack.analytics import Client

    calls = send_with(Client, "py-rudder", gateway)  # gzips by default
    check_python_events(journal(gateway, "py-rudder"), calls, "analytics-python", identify_traits_in_context=True)


def test_segment_analytics_node(gateway):
    out = subprocess.run(
        ["node", os.path.join(HERE, "send_node.mjs")],
        env={**os.environ, "HANDOFF_URL": gateway["url"], "HANDOFF_WRITE_KEY": KEYS["node-segment"]},
        capture_output=True, text=True, timeout=120, cwd=HERE,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["errors"] == []
    assert report["statuses"] and all(s == 200 for s in report["statuses"])
    sent = report["sent"]
    assert len(sent) == 7

    stored = journal(gateway, "node-segment")
    by_id = {e["messageId"]: e["event"] for e in stored}
    assert sorted(by_id) == sorted(m["messageId"] for m in sent), "exactly the events the library sent"
    for m in sent:
        e = by_id[m["messageId"]]
        for key, value in m.items():
            if key == "timestamp":
                assert e["originalTimestamp"] == value
            else:
                assert e[key] == value, (key, m, e)
        assert e["receivedAt"] and e["timestamp"]
    assert {e["type"] for e in by_id.values()} == {"identify", "track", "page", "screen", "group", "alias"}
    assert metric(gateway, 'handoff_events_accepted_total{source="node-segment"}') == 7
