"""The data path against real SeaweedFS + OpenBao: ingest → staged (manifest last) → the drops a site's run
uses → the trainer's job (with the partner's scoped token). Plus tamper and isolation. (Rounds, quorum and
publish across a coordinator and sites: tests/integration/test_inprocess_run.py, tests/e2e/.)"""

from __future__ import annotations

import json

import pytest

from lepton_tasks.adapters.manifest import read_manifest
from lepton_tasks.core.messages import dump
from lepton_tasks.ingest.stage import MANIFEST, ingest_drop, staged_manifests
from lepton_tasks.ops.demo import partner_name
from lepton_tasks.ops.partners import drop_as_partner, partner_storage
from lepton_tasks.ops.scenarios import SCENARIOS, to_csv_bytes

pytestmark = pytest.mark.integration

SCENARIO = "banks"
PARTNERS = [partner_name(p) for p in SCENARIOS[SCENARIO].partners]


@pytest.fixture(scope="module")
def staged(settings, admin_storage, operator_vault, onboard):
    sc = SCENARIOS[SCENARIO]
    results = {}
    for raw, df in sc.generate(7).items():
        name = partner_name(raw)
        onboard(name, [sc.dataset])
        key = f"{sc.dataset}/drop-1.csv"
        drop_as_partner(settings, name, key, to_csv_bytes(df))
        results[name] = ingest_drop(settings, admin_storage, operator_vault, name, key)
    return results


def test_drops_are_staged_encrypted_with_manifest_last(staged, settings, admin_storage, operator_vault):
    assert {r.status for r in staged.values()} == {"staged"}
    found = staged_manifests(admin_storage, settings, "banks", PARTNERS)
    assert set(found) == set(PARTNERS)
    for partner, keys in found.items():
        m = read_manifest(admin_storage, settings, operator_vault, partner, keys[0])
        assert m.contract == "banks@v1" and m.rows.train > 0 and m.rows.holdout > 0
        assert m.encryption.key_name == f"lepton-{partner}"
        assert "balance" in json.dumps(dump(m)["statistics_train"])
        for obj in m.objects.values():
            blob = admin_storage.get_bytes(settings.staging_bucket, obj.key)
            assert blob.startswith(b"LEPTON-ENV1\n")
            assert (
                b"PAR1" not in blob[:64] and b"customer_id" not in blob
            )  # no plaintext parquet in shared bucket


def test_same_drop_twice_is_skipped(staged, settings, admin_storage, operator_vault):
    name = PARTNERS[0]
    df = SCENARIOS[SCENARIO].generate(7)[SCENARIOS[SCENARIO].partners[0]]
    partner_storage(settings, name).put_bytes(settings.inbox_bucket(name), "banks/copy.csv", to_csv_bytes(df))
    before = sorted(o.key for o in admin_storage.list(settings.staging_bucket, f"{name}/"))
    res = ingest_drop(settings, admin_storage, operator_vault, name, "banks/copy.csv")
    assert res.status == "skipped" and res.drop_id == staged[name].drop_id
    assert sorted(o.key for o in admin_storage.list(settings.staging_bucket, f"{name}/")) == before


def test_bad_drop_is_quarantined_with_reason_and_original(staged, settings, admin_storage, operator_vault):
    from lepton_tasks.core.drops import DropError

    name = PARTNERS[1]
    bad = b"customer_id,student,balance,income,default\nc1,No,12.5,abc,No\n"
    partner_storage(settings, name).put_bytes(settings.inbox_bucket(name), "banks/bad.csv", bad)
    with pytest.raises(DropError) as err:
        ingest_drop(settings, admin_storage, operator_vault, name, "banks/bad.csv")
    assert err.value.column == "income" and err.value.row == 1
    inbox = settings.inbox_bucket(name)
    assert not admin_storage.exists(inbox, "banks/bad.csv")
    q = [o.key for o in admin_storage.list(inbox, "quarantine/")]
    reason_key = next(k for k in q if k.endswith("reason.json"))
    reason = admin_storage.get_json(inbox, reason_key)
    assert reason["column"] == "income" and reason["row"] == 1 and reason["fix"]
    original = next(k for k in q if k.endswith(".original"))
    assert admin_storage.get_bytes(inbox, original) == bad  # nothing lost
    # the partner itself can read why
    assert partner_storage(settings, name).get_json(inbox, reason_key)["code"] == reason["code"]
    # the shared index carries no values
    index = admin_storage.get_json(settings.quarantine_bucket, f"{name}/{reason['drop_id']}.json")
    assert "abc" not in json.dumps(index)


def test_tampered_manifest_is_rejected(staged, settings, admin_storage, operator_vault):
    from lepton_tasks.adapters.manifest import ManifestError

    name = PARTNERS[0]
    key = staged_manifests(admin_storage, settings, "banks", [name])[name][0]
    body = admin_storage.get_json(settings.staging_bucket, key)
    body["manifest"]["rows"]["train"] += 1
    tampered_key = key.replace(MANIFEST, "tampered.json")
    admin_storage.put_json(settings.staging_bucket, tampered_key, body)
    with pytest.raises(ManifestError, match="does not verify"):
        read_manifest(admin_storage, settings, operator_vault, name, tampered_key)


def test_staged_object_decrypts_only_with_own_token_and_fails_when_tampered(
    staged, settings, admin_storage, operator_vault, tmp_path
):
    from lepton_tasks.adapters.envelope import EnvelopeError, associated_data, decrypt_file
    from lepton_tasks.adapters.vault import Vault

    a, b = PARTNERS[0], PARTNERS[1]
    m = read_manifest(
        admin_storage,
        settings,
        operator_vault,
        a,
        staged_manifests(admin_storage, settings, "banks", [a])[a][0],
    )
    obj = m.objects["train"].key
    enc = admin_storage.download(settings.staging_bucket, obj, tmp_path / "t.enc")
    ad = associated_data(a, settings.staging_bucket, obj)
    own = Vault.connect(settings.vault_addr, operator_vault.trainer_token(a, "2m"))
    decrypt_file(
        enc, tmp_path / "ok.parquet", client=own.client, key_name=f"lepton-{a}", ad=ad, object_name=obj
    )
    assert (tmp_path / "ok.parquet").read_bytes()[:4] == b"PAR1"
    other = Vault.connect(settings.vault_addr, operator_vault.trainer_token(b, "2m"))
    with pytest.raises(EnvelopeError, match="denied"):
        decrypt_file(
            enc, tmp_path / "x.parquet", client=other.client, key_name=f"lepton-{a}", ad=ad, object_name=obj
        )
    with pytest.raises(EnvelopeError):  # moved to another key: associated data no longer matches
        decrypt_file(
            enc,
            tmp_path / "y.parquet",
            client=own.client,
            key_name=f"lepton-{a}",
            ad=associated_data(a, settings.staging_bucket, obj + ".moved"),
            object_name=obj,
        )
    raw = bytearray(enc.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (tmp_path / "flip.enc").write_bytes(bytes(raw))
    with pytest.raises(EnvelopeError, match="tampered"):
        decrypt_file(
            tmp_path / "flip.enc",
            tmp_path / "z.parquet",
            client=own.client,
            key_name=f"lepton-{a}",
            ad=ad,
            object_name=obj,
        )
    assert not (tmp_path / "z.parquet").exists()  # nothing published from a failed stream


def test_trainer_entrypoint_refuses_another_partners_token(
    staged, settings, admin_storage, operator_vault, monkeypatch, capsys
):
    """The real entrypoint, given partner A's job but partner B's token, cannot decrypt: exit 3, no upload."""
    from lepton_tasks.core.messages import HParams
    from lepton_tasks.site.local_run import trainer_job
    from lepton_tasks.trainer.__main__ import main
    from tests.integration.local_plan import write_local_plan

    a, b = PARTNERS[0], PARTNERS[1]
    write_local_plan(
        settings,
        admin_storage,
        operator_vault,
        run_id="deny-run",
        partner=a,
        dataset="banks",
        hparams=HParams(rounds=1, min_partners=1),
    )
    job = trainer_job(
        settings, admin_storage, operator_vault, run_id="deny-run", partner=a, mode="train", round_number=1
    )
    job = job.model_copy(update={"vault_token": operator_vault.trainer_token(b, ttl="2m")})
    monkeypatch.setenv("LEPTON_JOB", json.dumps(dump(job)))
    assert main(["--partner", a, "--mode", "train", "--round", "1"]) == 3
    err = capsys.readouterr().err
    assert "security error" in err and job.vault_token not in err
    assert not admin_storage.exists(settings.models_bucket, job.output_key)
    monkeypatch.setenv("LEPTON_JOB", json.dumps({**dump(job), "partner": b}))
    assert main(["--partner", a, "--mode", "train", "--round", "1"]) == 2  # a job for someone else is refused


def test_key_rotation_keeps_data_readable_until_min_decryption_version_is_raised(
    settings, admin_storage, operator_vault, root_vault, onboard, tmp_path
):
    from lepton_tasks.adapters.envelope import (
        EnvelopeError,
        associated_data,
        decrypt_file,
        encrypt_file,
        rewrap_file,
    )
    from lepton_tasks.adapters.vault import Vault

    onboard("rot-a")
    key = "lepton-rot-a"
    src = tmp_path / "plain.bin"
    src.write_bytes(b"partner data " * 1000)
    ad = associated_data("rot-a", "staging", "rot-a/x")
    encrypt_file(src, tmp_path / "v1.enc", client=operator_vault.client, key_name=key, ad=ad)
    assert root_vault.rotate_key(key) == 2
    encrypt_file(src, tmp_path / "v2.enc", client=operator_vault.client, key_name=key, ad=ad)
    reader = Vault.connect(settings.vault_addr, operator_vault.trainer_token("rot-a", "2m"))
    for name in ("v1", "v2"):  # no downtime: both versions decrypt after rotation
        decrypt_file(
            tmp_path / f"{name}.enc",
            tmp_path / f"{name}.out",
            client=reader.client,
            key_name=key,
            ad=ad,
            object_name=name,
        )
        assert (tmp_path / f"{name}.out").read_bytes() == src.read_bytes()
    rewrap_file(
        tmp_path / "v1.enc",
        tmp_path / "v1-rewrapped.enc",
        client=operator_vault.client,
        key_name=key,
        ad=ad,
        object_name="v1",
    )
    root_vault.set_min_decryption_version(key, 2)
    decrypt_file(
        tmp_path / "v1-rewrapped.enc",
        tmp_path / "v1r.out",
        client=reader.client,
        key_name=key,
        ad=ad,
        object_name="v1r",
    )  # rewrapped: readable under the new minimum
    assert (tmp_path / "v1r.out").read_bytes() == src.read_bytes()
    with pytest.raises(EnvelopeError):
        decrypt_file(
            tmp_path / "v1.enc",
            tmp_path / "v1b.out",
            client=reader.client,
            key_name=key,
            ad=ad,
            object_name="v1",
        )
    decrypt_file(
        tmp_path / "v2.enc", tmp_path / "v2b.out", client=reader.client, key_name=key, ad=ad, object_name="v2"
    )


def test_a_file_uploaded_again_replaces_its_earlier_version_at_the_site(
    staged, settings, admin_storage, operator_vault
):
    """The same inbox key uploaded again with new content is a new drop; the site's next job uses only the
    latest (``site.training.select_drops``, over the manifests as staged and verified)."""
    from lepton_tasks.core.contracts import load_contract
    from lepton_tasks.site.training import select_drops

    name = PARTNERS[0]
    df = SCENARIOS[SCENARIO].generate(7)[SCENARIOS[SCENARIO].partners[0]]
    drop_as_partner(settings, name, "banks/drop-1.csv", to_csv_bytes(df.iloc[:-50]))  # a corrected export
    res = ingest_drop(settings, admin_storage, operator_vault, name, "banks/drop-1.csv")
    assert res.status == "staged" and res.drop_id != staged[name].drop_id
    keys = staged_manifests(admin_storage, settings, "banks", [name])[name]
    manifests = {k: read_manifest(admin_storage, settings, operator_vault, name, k, "banks") for k in keys}
    selected, left_out = select_drops(manifests, load_contract("banks").sha256)
    # other test modules may have staged more files for this partner (other keys): those add up, untouched
    assert res.manifest_key in selected and staged[name].manifest_key not in selected
    assert left_out[staged[name].manifest_key] == f"superseded by {res.manifest_key}"
    rows = manifests[res.manifest_key].rows
    assert rows.train + rows.holdout == sum(staged[name].rows.values()) - 50
