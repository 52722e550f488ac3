"""The trainer entrypoint: ``python -m lepton_tasks.trainer`` (inside the partner's container, or a subprocess).

It receives its job (see :func:`lepton_tasks.federation.plan.trainer_job`) in the ``LEPTON_JOB`` environment
variable — never on the command line — holding presigned URLs for exactly this partner's objects and a
short-lived Vault token that can decrypt/verify with only this partner's key. It

1. downloads each committed drop's manifest and verifies its HMAC with the partner's key (token);
2. downloads the encrypted splits, checks their SHA-256 against the manifest, decrypts them (Tink + Vault)
   to a private temp dir;
3. normalizes with the merged federated statistics; then
   - ``train``: trains locally from the current global weights and PUTs ``weights + n + metrics``;
   - ``local``: trains a local-only model (this partner's data alone, for comparison) and PUTs its weights;
   - ``evaluate``: evaluates the final global model and every partner's local-only model on this partner's
     held-out split and PUTs metrics + score histograms (aggregates, never rows).

Exit code 0 on success; 2 on a bad job; 3 on a security failure (signature, hash, decrypt denied).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("lepton.trainer")


class SecurityError(RuntimeError):
    """A manifest signature, a ciphertext hash or a decryption failed."""


def _fetch(url: str) -> bytes:
    """GET a (small) object through its presigned URL."""
    with urllib.request.urlopen(url, timeout=300) as resp:
        return resp.read()


def _download(url: str, dest: Path) -> Path:
    """GET an object through its presigned URL, streamed to ``dest``."""
    with urllib.request.urlopen(url, timeout=300) as resp, open(dest, "wb") as f:
        while block := resp.read(1024 * 1024):
            f.write(block)
    return dest


def _put(url: str, data: bytes, content_type: str) -> None:
    req = urllib.request.Request(url, data=data, method="PUT", headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=300) as resp:
        if resp.status not in (200, 204):
            raise RuntimeError(f"upload failed with HTTP {resp.status}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1024 * 1024):
            h.update(block)
    return h.hexdigest()


def load_partner_frames(job: dict[str, Any], work: Path) -> tuple[Any, Any, list[str]]:
    """Verify + decrypt this partner's drops → (train frame, holdout frame, drop hashes). Plaintext stays in work."""
    import hvac.exceptions
    import pandas as pd

    from lepton_tasks.adapters.envelope import EnvelopeError, associated_data, decrypt_file
    from lepton_tasks.adapters.vault import Vault
    from lepton_tasks.ingest.stage import canonical

    vault = Vault.connect(job["vault_addr"], job["vault_token"], job["transit_mount"])
    partner, key_name = job["partner"], job["key_name"]
    frames: dict[str, list[pd.DataFrame]] = {"train": [], "holdout": []}
    hashes = []
    for i, drop in enumerate(job["drops"]):
        body = json.loads(_fetch(drop["manifest_url"]))
        manifest = body.get("manifest")
        if not isinstance(manifest, dict):
            raise SecurityError(f"{drop['manifest_key']}: not a signed Lepton manifest")
        try:
            valid = vault.verify(key_name, canonical(manifest), body.get("hmac", ""))
        except hvac.exceptions.Forbidden as exc:
            raise SecurityError(
                f"{drop['manifest_key']}: Vault denied verification with {key_name}: this token "
                f"is not {partner}'s"
            ) from exc
        if not valid:
            raise SecurityError(f"{drop['manifest_key']}: manifest signature does not verify with {key_name}")
        if manifest.get("partner") != partner or manifest.get("dataset") != job["dataset"]:
            raise SecurityError(
                f"{drop['manifest_key']}: manifest is for {manifest.get('partner')}/"
                f"{manifest.get('dataset')}, not {partner}/{job['dataset']}"
            )
        hashes.append(manifest["drop_sha256"])
        for split in ("train", "holdout"):
            obj = drop[split]
            if manifest["objects"][split]["key"] != obj["key"]:
                raise SecurityError(f"{obj['key']}: not the object the manifest commits to")
            enc = _download(obj["url"], work / f"{i}-{split}.enc")
            digest = _sha256(enc)
            if digest != manifest["objects"][split]["sha256"]:
                raise SecurityError(
                    f"{obj['key']}: ciphertext SHA-256 {digest[:12]}… does not match the manifest"
                )
            plain = work / f"{i}-{split}.parquet"
            try:
                decrypt_file(
                    enc,
                    plain,
                    client=vault.client,
                    key_name=key_name,
                    ad=associated_data(partner, job["staging_bucket"], obj["key"]),
                    object_name=obj["key"],
                    transit_mount=job["transit_mount"],
                )
            except EnvelopeError as exc:
                raise SecurityError(str(exc)) from exc
            enc.unlink()
            frames[split].append(pd.read_parquet(plain))
            plain.unlink()
    train = pd.concat(frames["train"], ignore_index=True)
    holdout = pd.concat(frames["holdout"], ignore_index=True)
    return train, holdout, hashes


def _holdout_frame(train_m: Any, holdout_m: Any, contract: Any) -> tuple[Any, dict[str, Any]]:
    """The frame + kwargs to score held-out rows: for sequence models, the whole history is context."""
    kw: dict[str, Any] = {"tie_break": contract.row_key}
    if contract.model.kind != "sequence":
        return holdout_m, kw
    import numpy as np
    import pandas as pd

    kw["targets"] = np.r_[np.zeros(len(train_m), bool), np.ones(len(holdout_m), bool)]
    return pd.concat([train_m, holdout_m], ignore_index=True), kw


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Execute one trainer job; return the (non-secret) summary that was uploaded."""
    from lepton_tasks.core import weights as wio
    from lepton_tasks.core.contracts import load_contract
    from lepton_tasks.core.features import GlobalStats, SufficientStats, feature_names, transform
    from lepton_tasks.trainer.local import evaluate_weights, train_local

    contract = load_contract(job["dataset"])
    hp = job["hparams"]
    gstats = GlobalStats.from_stats(SufficientStats.model_validate_json(_fetch(job["stats_url"])), contract)
    names = feature_names(contract, gstats)
    global_w = None
    if job.get("global_weights_url"):
        global_w, _ = wio.loads(_fetch(job["global_weights_url"]))
    with tempfile.TemporaryDirectory(prefix="lepton-trainer-") as tmp:
        train_df, holdout_df, hashes = load_partner_frames(job, Path(tmp))
    train_m = transform(train_df, contract, gstats)
    if job["mode"] == "train":
        held_out = None
        if (
            global_w is not None
        ):  # federated evaluation of the incoming global model on this partner's holdout
            eval_frame, eval_kw = _holdout_frame(train_m, transform(holdout_df, contract, gstats), contract)
            held_out = evaluate_weights(
                eval_frame, contract.model, names, global_w, with_summary=True, **eval_kw
            )
        res = train_local(
            train_m,
            contract.model,
            names,
            global_weights=global_w,
            epochs=hp["epochs"],
            batch_size=hp["batch_size"],
            learning_rate=hp["learning_rate"],
            seed=hp["seed"] + job["round"],
            fedprox_mu=hp["fedprox_mu"],
            tie_break=contract.row_key,
        )
        meta = {
            "partner": job["partner"],
            "round": job["round"],
            "run_id": job["run_id"],
            "n_samples": res.n_samples,
            "metrics": res.metrics,
            "drops": hashes,
            "global_prev_holdout": held_out,
        }
        _put(job["output_url"], wio.dumps(res.weights, meta), "application/octet-stream")
        return {k: v for k, v in meta.items() if k not in ("drops", "global_prev_holdout")}
    if job["mode"] == "local":  # a model trained on this partner's data alone, for comparison
        res = train_local(
            train_m,
            contract.model,
            names,
            global_weights=None,
            epochs=hp["local_only_epochs"],
            batch_size=hp["batch_size"],
            learning_rate=hp["learning_rate"],
            seed=hp["seed"],
            tie_break=contract.row_key,
        )
        meta = {
            "partner": job["partner"],
            "run_id": job["run_id"],
            "kind": "local-only",
            "n_samples": res.n_samples,
            "metrics": res.metrics,
        }
        _put(job["output_url"], wio.dumps(res.weights, meta), "application/octet-stream")
        return {k: v for k, v in meta.items() if k != "metrics"}
    eval_frame, eval_kw = _holdout_frame(train_m, transform(holdout_df, contract, gstats), contract)
    g = evaluate_weights(eval_frame, contract.model, names, global_w, with_summary=True, **eval_kw)
    local_models = {}
    for owner, url in sorted(job.get("local_models", {}).items()):
        weights_l, _ = wio.loads(_fetch(url))
        local_models[owner] = evaluate_weights(
            eval_frame, contract.model, names, weights_l, with_summary=True, **eval_kw
        )
    out = {
        "partner": job["partner"],
        "run_id": job["run_id"],
        "global": g,
        "local_models": local_models,
        "rows": {"train": len(train_df), "holdout": len(holdout_df)},
    }
    _put(job["output_url"], json.dumps(out, default=float).encode(), "application/json")
    return {
        "partner": job["partner"],
        "global_auc": g.get("auc"),
        "local_models_scored": sorted(local_models),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lepton_tasks.trainer", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--partner", required=True, help="the partner this container serves (checked against the job)"
    )
    parser.add_argument("--mode", choices=("train", "local", "evaluate"), required=True)
    parser.add_argument("--round", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s trainer[%(name)s] %(levelname)s %(message)s")
    raw = os.environ.pop("LEPTON_JOB", None)
    if not raw:
        print("error: no job: the LEPTON_JOB environment variable is empty", file=sys.stderr)
        return 2
    job = json.loads(raw)
    if job.get("partner") != args.partner or job.get("mode") != args.mode:
        print(
            f"error: job is for {job.get('partner')}/{job.get('mode')}, not {args.partner}/{args.mode}",
            file=sys.stderr,
        )
        return 2
    log.info("partner %s: %s (run %s, round %s)", args.partner, args.mode, job["run_id"], job["round"])
    try:
        summary = run_job(job)
    except SecurityError as exc:
        print(f"security error: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(summary, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
