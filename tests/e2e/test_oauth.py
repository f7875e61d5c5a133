"""End-to-end: Python's authlib OAuth 2 client against Handoff's authorization server.

A client created with `handoff clients create` gets a token by client credentials, calls an admin
route, introspects and revokes the token, and sees the next call refused.
"""

import json
import subprocess

import requests
from authlib.integrations.requests_client import OAuth2Session

from test_sdks import BIN, gateway  # noqa: F401  (pytest fixture)


def create_client(data_dir, scopes):
    out = subprocess.run(
        [BIN, "clients", "create", "--name", "authlib-e2e", "--scopes", scopes, "--format", "json",
         "--data-dir", data_dir],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def test_authlib_client_credentials_introspect_revoke(gateway):  # noqa: F811
    url = gateway["url"]
    creds = create_client(gateway["data_dir"], "admin:read audit:read")
    assert creds["scopes"] == ["admin:read", "audit:read"]

    meta = requests.get(url + "/.well-known/oauth-authorization-server", timeout=10).json()
    session = OAuth2Session(creds["client_id"], creds["client_secret"], scope="admin:read",
                            token_endpoint_auth_method="client_secret_basic")
    token = session.fetch_token(meta["token_endpoint"], grant_type="client_credentials")
    assert token["token_type"] == "Bearer" and token["scope"] == "admin:read"
    assert 0 < token["expires_in"] <= 300

    clients = session.get(url + "/admin/v1/clients")
    assert clients.status_code == 200
    assert creds["client_id"] in [c["client_id"] for c in clients.json()["clients"]]
    # Least privilege: the token was asked for admin:read only, so the audit log is refused.
    assert session.get(url + "/admin/v1/audit").status_code == 403

    info = session.introspect_token(meta["introspection_endpoint"], token=token["access_token"]).json()
    assert info["active"] is True and info["client_id"] == creds["client_id"] and info["scope"] == "admin:read"

    assert session.revoke_token(meta["revocation_endpoint"], token=token["access_token"]).status_code == 200
    refused = session.get(url + "/admin/v1/clients")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "auth.token.revoked"
    info = session.introspect_token(meta["introspection_endpoint"], token=token["access_token"]).json()
    assert info == {"active": False}

    # client_secret_post works as well.
    post = OAuth2Session(creds["client_id"], creds["client_secret"], token_endpoint_auth_method="client_secret_post")
    assert post.fetch_token(meta["token_endpoint"], grant_type="client_credentials")["scope"] == "admin:read audit:read"
