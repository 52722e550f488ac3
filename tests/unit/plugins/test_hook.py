"""LeptonHook: the connections become settings (no secret in DAG code, nothing at parse time)."""

from __future__ import annotations

import json

from lepton_airflow.hook import LeptonHook


def test_settings_from_the_connection_json_in_the_environment(monkeypatch):
    s3 = {
        "conn_type": "aws",
        "login": "AK",
        "password": "s3-secret-9f2",
        "extra": {"endpoint_url": "https://s3.x:9000"},
    }
    vault = {
        "conn_type": "vault",
        "password": "vault-token-7c1",
        "extra": {"url": "http://v:8200", "transit_mount": "tr"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_LEPTON_S3", json.dumps(s3))
    monkeypatch.setenv("AIRFLOW_CONN_LEPTON_VAULT", json.dumps(vault))
    s = LeptonHook.from_env()
    assert (s.s3_endpoint, s.s3_secure, s.s3_access_key) == ("s3.x:9000", True, "AK")
    assert (
        s.s3_secret_key.get_secret_value() == "s3-secret-9f2"
        and s.vault_token.get_secret_value() == "vault-token-7c1"
    )
    assert (s.vault_addr, s.transit_mount) == ("http://v:8200", "tr")
    assert "s3-secret-9f2" not in repr(s) and "vault-token-7c1" not in repr(s)
