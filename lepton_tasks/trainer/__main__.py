"""The trainer entrypoint: ``python -m lepton_tasks.trainer`` (in the partner's container, or a subprocess).

Its job (a :class:`~lepton_tasks.core.messages.TrainerJob`, see
:func:`lepton_tasks.site.local_run.trainer_job`) holds presigned URLs for exactly this partner's objects, a
short-lived Vault token that can decrypt/verify with only this partner's key, and the dataset's contract
(checked against its hash). It never comes on the command line. The operator gives it **response-wrapped**:
the environment holds only ``LEPTON_JOB_TOKEN`` (a single-use Vault wrapping token, created at
``sys/wrapping/wrap``) and ``LEPTON_JOB_VAULT_ADDR``; the trainer checks the token's creation path, unwraps it
once, and drops both variables, so what ``docker inspect`` shows afterwards is a spent token. (A plain job in
``LEPTON_JOB`` is still accepted, for tools and tests that build one themselves.) It

0. unwraps its job (a token already used, expired or created elsewhere: exit 3; Vault unreachable: exit 4);
1. downloads each committed drop's manifest and verifies it (:mod:`lepton_tasks.adapters.manifest`);
2. downloads the encrypted splits, checks their SHA-256 against the manifest, decrypts them (Tink + Vault)
   to a private temp dir;
3. normalizes with the merged federated statistics; then
   - ``train``: trains locally from the current global weights and PUTs ``weights + n + metrics`` (and, when
     the job sets ``hparams.dp``, trains with DP-SGD and adds its privacy charge: sigma, q, steps, epsilon);
   - ``local``: trains a local-only model (this partner's data alone, for comparison) and PUTs its weights
     (with DP-SGD too under ``hparams.dp``: those weights go to every partner's evaluation);
   - ``evaluate``: evaluates the final global model and every partner's local-only model on this partner's
     held-out split and PUTs metrics + score histograms (aggregates, never rows).

Exit codes (the operator maps them; see :data:`EXIT_CODES`): 0 success; 2 a bad job (invalid, wrong
partner/mode, contract hash mismatch: retrying cannot help); 3 a security failure (signature, hash,
decryption denied: never retried); 4 a transient failure (a service unreachable: retry later); 1 anything
else (a bug: the last lines of stderr say what).
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
from collections.abc import MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lepton_tasks.core.messages import TrainerJob

log = logging.getLogger("lepton.trainer")

EXIT_OK, EXIT_BUG, EXIT_BAD_JOB, EXIT_SECURITY, EXIT_TRANSIENT = 0, 1, 2, 3, 4
#: the operator's environment variables: the wrapped job's single-use token and where to unwrap it
JOB_TOKEN_ENV, JOB_VAULT_ENV, PLAIN_JOB_ENV = "LEPTON_JOB_TOKEN", "LEPTON_JOB_VAULT_ADDR", "LEPTON_JOB"
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_BUG: "unexpected error",
    EXIT_BAD_JOB: "bad job",
    EXIT_SECURITY: "security failure",
    EXIT_TRANSIENT: "transient failure",
}


class SecurityError(RuntimeError):
    """A manifest signature, a ciphertext hash or a decryption failed."""


class BadJobError(ValueError):
    """The job cannot be run as given (retrying the same job cannot help)."""


class TransientError(RuntimeError):
    """A service did not answer (retry later)."""


def read_job_env(environ: MutableMapping[str, str]) -> tuple[str, str]:
    """``(job JSON, where it came from)`` from the environment, removing every job variable from it.

    A wrapped job (:data:`JOB_TOKEN_ENV`) is unwrapped once, after checking that its wrapping token was
    created at ``sys/wrapping/wrap``. Raises :class:`BadJobError` (nothing usable given),
    :class:`SecurityError` (token used, expired, never issued or created elsewhere: the job may have been
    intercepted) or :class:`TransientError` (Vault did not answer).
    """
    token = environ.pop(JOB_TOKEN_ENV, None)
    addr = environ.pop(JOB_VAULT_ENV, None)
    plain = environ.pop(PLAIN_JOB_ENV, None)
    if not token:
        if not plain:
            raise BadJobError(f"neither {JOB_TOKEN_ENV} nor {PLAIN_JOB_ENV} is set")
        return plain, PLAIN_JOB_ENV
    if not addr:
        raise BadJobError(f"{JOB_TOKEN_ENV} is set but {JOB_VAULT_ENV} (where to unwrap it) is not")
    from lepton_tasks.adapters.vault import VaultError, VaultUnavailable, unwrap_data

    try:
        data = unwrap_data(addr, token)
    except VaultUnavailable as exc:
        raise TransientError(f"cannot unwrap the job: {exc}") from exc
    except VaultError as exc:
        raise SecurityError(f"the job could not be unwrapped: {exc}") from exc
    job = data.get("job")
    if not isinstance(job, str) or not job:
        raise BadJobError("the wrapped data holds no job")
    return job, "the wrapped job"


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


def load_partner_frames(job: TrainerJob, work: Path) -> tuple[Any, Any, list[str]]:
    """Verify + decrypt this partner's drops → (train, holdout, drop hashes); plaintext stays in ``work``."""
    import pandas as pd

    from lepton_tasks.adapters.envelope import EnvelopeError, associated_data, decrypt_file
    from lepton_tasks.adapters.manifest import ManifestError, verify_manifest
    from lepton_tasks.adapters.vault import Vault

    vault = Vault.connect(job.vault_addr, job.vault_token, job.transit_mount)
    partner, key_name = job.partner, job.key_name
    frames: dict[str, list[pd.DataFrame]] = {"train": [], "holdout": []}
    hashes = []
    for i, drop in enumerate(job.drops):
        try:
            manifest = verify_manifest(
                vault,
                key_name,
                _fetch(drop.manifest_url),
                where=drop.manifest_key,
                partner=partner,
                dataset=job.dataset,
            )
        except ManifestError as exc:
            raise SecurityError(str(exc)) from exc
        hashes.append(manifest.drop_sha256)
        for split in ("train", "holdout"):
            obj = drop.train if split == "train" else drop.holdout
            committed = manifest.objects[split]
            if committed.key != obj.key:
                raise SecurityError(f"{obj.key}: not the object the manifest commits to")
            enc = _download(obj.url, work / f"{i}-{split}.enc")
            digest = _sha256(enc)
            if digest != committed.sha256:
                raise SecurityError(
                    f"{obj.key}: ciphertext SHA-256 {digest[:12]}… does not match the manifest"
                )
            plain = work / f"{i}-{split}.parquet"
            try:
                decrypt_file(
                    enc,
                    plain,
                    client=vault.client,
                    key_name=key_name,
                    ad=associated_data(partner, job.staging_bucket, obj.key),
                    object_name=obj.key,
                    transit_mount=job.transit_mount,
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


def run_job(job: TrainerJob) -> dict[str, Any]:
    """Execute one trainer job; return the (non-secret) summary that was uploaded."""
    from lepton_tasks.core import weights as wio
    from lepton_tasks.core.contracts import contract_from_document
    from lepton_tasks.core.features import GlobalStats, SufficientStats, feature_names, transform
    from lepton_tasks.core.messages import EvalResult, LocalModelMeta, UpdateMeta, dump
    from lepton_tasks.trainer.local import evaluate_weights, train_local

    try:
        contract = contract_from_document(job.contract, job.contract_sha256)
    except ValueError as exc:
        raise BadJobError(f"the job's contract for {job.dataset}: {exc}") from exc
    if contract.name != job.dataset:
        raise BadJobError(f"the job's contract is {contract.name}, not {job.dataset}")
    hp = job.hparams
    gstats = GlobalStats.from_stats(SufficientStats.model_validate_json(_fetch(job.stats_url)), contract)
    names = feature_names(contract, gstats)
    global_w = None
    if job.global_weights_url:
        global_w, _ = wio.loads(_fetch(job.global_weights_url))
    with tempfile.TemporaryDirectory(prefix="lepton-trainer-") as tmp:
        train_df, holdout_df, hashes = load_partner_frames(job, Path(tmp))
    train_m = transform(train_df, contract, gstats)
    if job.mode == "train":
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
            epochs=hp.local_epochs,
            batch_size=hp.batch_size,
            learning_rate=hp.learning_rate,
            seed=hp.seed + job.round,
            fedprox_mu=hp.fedprox_mu,
            tie_break=contract.row_key,
            dp=hp.dp,
        )
        update = UpdateMeta(
            partner=job.partner,
            round=job.round,
            run_id=job.run_id,
            n_samples=res.n_samples,
            metrics=_scalars(res.metrics),
            drops=hashes,
            global_prev_holdout=_jsonable(held_out),
            privacy=res.privacy,
        )
        _put(job.output_url, wio.dumps(res.weights, dump(update)), "application/octet-stream")
        return {"partner": job.partner, "round": job.round, "run_id": job.run_id, "n_samples": res.n_samples}
    if job.mode == "local":  # a model trained on this partner's data alone, for comparison
        res = train_local(
            train_m,
            contract.model,
            names,
            global_weights=None,
            epochs=hp.local_only_epochs,
            batch_size=hp.batch_size,
            learning_rate=hp.learning_rate,
            seed=hp.seed,
            tie_break=contract.row_key,
            dp=hp.dp,  # its weights leave the site (every partner's evaluate job scores them): DP too
        )
        meta = LocalModelMeta(
            partner=job.partner,
            run_id=job.run_id,
            n_samples=res.n_samples,
            metrics=_scalars(res.metrics),
            privacy=res.privacy,
        )
        _put(job.output_url, wio.dumps(res.weights, dump(meta)), "application/octet-stream")
        return {
            "partner": job.partner,
            "run_id": job.run_id,
            "kind": "local-only",
            "n_samples": res.n_samples,
        }
    if global_w is None:
        raise BadJobError("an evaluate job needs the global weights (global_weights_url is empty)")
    eval_frame, eval_kw = _holdout_frame(train_m, transform(holdout_df, contract, gstats), contract)
    g = evaluate_weights(eval_frame, contract.model, names, global_w, with_summary=True, **eval_kw)
    local_models = {}
    for owner, url in sorted(job.local_models.items()):
        weights_l, _ = wio.loads(_fetch(url))
        local_models[owner] = evaluate_weights(
            eval_frame, contract.model, names, weights_l, with_summary=True, **eval_kw
        )
    out = EvalResult(
        partner=job.partner,
        run_id=job.run_id,
        global_=_jsonable(g),
        local_models={k: _jsonable(v) for k, v in local_models.items()},
        rows={"train": len(train_df), "holdout": len(holdout_df)},
    )
    _put(job.output_url, json.dumps(dump(out)).encode(), "application/json")
    return {"partner": job.partner, "global_auc": g.get("auc"), "local_models_scored": sorted(local_models)}


def _scalars(metrics: dict[str, Any]) -> dict[str, float | int | None]:
    """The numeric entries of a training-metrics dict (what an update's metadata carries): ``notes`` (a list
    of strings) and a ``class_weight`` name or mapping stay out."""
    return {
        k: v if isinstance(v, (int, type(None))) else float(v)
        for k, v in _jsonable(metrics).items()
        if isinstance(v, (int, float, type(None)))
    }


def _jsonable(obj: Any) -> Any:
    """numpy scalars → Python numbers (metric dicts come from numpy)."""
    return None if obj is None else json.loads(json.dumps(obj, default=float))


def _is_transient(exc: BaseException) -> bool:
    """A service that did not answer (connection refused/reset, timeout, 5xx): worth retrying later."""
    import urllib.error

    import hvac.exceptions
    import requests

    from lepton_tasks.adapters.vault import VaultUnavailable

    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500
    return isinstance(
        exc,
        (
            urllib.error.URLError,
            ConnectionError,
            TimeoutError,
            requests.ConnectionError,
            requests.Timeout,
            hvac.exceptions.VaultDown,
            hvac.exceptions.InternalServerError,
            hvac.exceptions.BadGateway,
            VaultUnavailable,
            TransientError,
        ),
    )


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
    from lepton_tasks.core.messages import MessageError, TrainerJob, load

    try:
        raw, where = read_job_env(os.environ)
    except BadJobError as exc:
        print(f"bad job: {exc}", file=sys.stderr)
        return EXIT_BAD_JOB
    except SecurityError as exc:
        print(f"security error: {exc}", file=sys.stderr)
        return EXIT_SECURITY
    except TransientError as exc:
        print(f"transient error (a service did not answer; retry): {exc}", file=sys.stderr)
        return EXIT_TRANSIENT
    try:
        job = load(TrainerJob, raw, where=where)
    except MessageError as exc:
        print(f"bad job: {exc}", file=sys.stderr)
        return EXIT_BAD_JOB
    if job.partner != args.partner or job.mode != args.mode:
        print(f"bad job: it is for {job.partner}/{job.mode}, not {args.partner}/{args.mode}", file=sys.stderr)
        return EXIT_BAD_JOB
    log.info("partner %s: %s (run %s, round %s)", args.partner, args.mode, job.run_id, job.round)
    try:
        if job.vault_token_wrapped:
            from lepton_tasks.adapters.vault import VaultError, VaultUnavailable, unwrap_token

            try:  # a used or substituted wrapping token may mean the job was intercepted: a security failure
                token = unwrap_token(job.vault_addr, job.vault_token)
            except VaultUnavailable:
                raise  # transient: handled below (exit 4)
            except VaultError as exc:
                raise SecurityError(f"the job's Vault token could not be unwrapped: {exc}") from exc
            job = job.model_copy(update={"vault_token": token})
        summary = run_job(job)
    except SecurityError as exc:
        print(f"security error: {exc}", file=sys.stderr)
        return EXIT_SECURITY
    except BadJobError as exc:
        print(f"bad job: {exc}", file=sys.stderr)
        return EXIT_BAD_JOB
    except Exception as exc:
        log.exception("trainer failed")
        if _is_transient(exc):
            print(
                f"transient error (a service did not answer; retry): {type(exc).__name__}: {exc}",
                file=sys.stderr,
            )
            return EXIT_TRANSIENT
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_BUG
    print(json.dumps(summary, default=float))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
