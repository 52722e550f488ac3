"""Every object a real coordinator + sites run wrote, loaded through its model (a drifted field fails here).

Issue 9's done criterion ("every boundary object is a model"): the e2e and in-process runs call
:func:`load_run_objects` on their own run, so each example object comes from real code, not a fixture:

- the coordinator's ``models`` bucket: the run's spec (``run.json``, ``RunSpec``), each round's decision
  (``record.json``, ``RoundRecord``), sent job headers (``sent.json``, ``JobHeader``) and secure aggregation
  (``secagg.json``, ``AggregationState``), the merged statistics (``stats.json``, ``MergedStatistics``), the
  meta of every global weights file (``GlobalWeightsMeta``), the published ``metrics.json`` (``RunMetrics``),
  ``model/VERSION.json`` (``ModelVersion``) and the registry entry;
- each site's exchange bucket: every message (``SignedMessage``) and its payload through the model its
  ``payload_schema`` names (``RoundJob``, ``RoundAnswer``, ``RoundRefusal``, the ``SecAgg*`` phases), the
  global weights beside a job (``GlobalWeightsMeta``) and an update beside an answer
  (``ExchangeUpdateMeta``);
- each site's own stack: its staged manifests (``SignedManifest``), its local run (``Plan``, the merged
  statistics ``SufficientStats``, the coordinator's global weights, the trainer's ``UpdateMeta``,
  ``EvalResult``, ``LocalModelMeta``), its outbound log (``OutboundRecord``) and state (``StateDoc``).

What has no model is returned by name (``unmodelled``): only files that are not data objects (the report's
HTML, the Keras model) and the masked inputs of secure aggregation (ring elements, ``secagg_round``), so a
test can print them and a reader sees the rest is covered.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel


@dataclass
class RunObjects:
    #: model name → how many real objects went through it
    seen: dict[str, int] = field(default_factory=dict)
    #: ``bucket/key`` of each object this run wrote that no model describes yet
    unmodelled: list[str] = field(default_factory=list)

    def count(self, model: type[BaseModel]) -> None:
        self.seen[model.__name__] = self.seen.get(model.__name__, 0) + 1


def _payload_models() -> dict[str, type[Any]]:
    from lepton_tasks.core import secagg_messages as sm
    from lepton_tasks.core.messages import RoundAnswer, RoundJob, RoundRefusal

    models: list[type[Any]] = [RoundJob, RoundAnswer, RoundRefusal]
    models += [m for m in vars(sm).values() if isinstance(m, type) and "payload_schema" in vars(m)]
    return {m.payload_schema: m for m in models}


def load_run_objects(topo: Any, run_id: str, dataset: str) -> RunObjects:
    """Load every object of exchange run ``run_id`` over ``topo`` through its model; raises on the first
    object that does not validate (``MessageError``, ``ValidationError``, ``OutboundLogError``)."""
    from lepton_tasks.adapters.storage import Storage
    from lepton_tasks.core import weights as wio
    from lepton_tasks.core.exchange import SignedMessage
    from lepton_tasks.core.features import SufficientStats
    from lepton_tasks.core.messages import (
        EvalResult,
        ExchangeUpdateMeta,
        GlobalWeightsMeta,
        LocalModelMeta,
        MergedStatistics,
        ModelVersion,
        Plan,
        RegistryEntry,
        RunMetrics,
        SignedManifest,
        UpdateMeta,
        load,
    )
    from lepton_tasks.core.outbound_log import OutboundRecord, read_log
    from lepton_tasks.federation.enrollment import SiteRegistry
    from lepton_tasks.federation.exchange import UPDATE_SUFFIX, WEIGHTS_SUFFIX
    from lepton_tasks.federation.run_records import RoundRecord, RunSpec, run_prefix
    from lepton_tasks.federation.secagg_round import AggregationState
    from lepton_tasks.ingest.stage import staged_manifests
    from lepton_tasks.site.enrollment import SiteFiles
    from lepton_tasks.site.local_run import run_prefix as local_prefix
    from lepton_tasks.site.state import SiteState, StateDoc
    from lepton_tasks.site.training import local_run_id

    out = RunObjects()
    payloads = _payload_models()
    cs = topo.coordinator().settings()
    admin = Storage.from_settings(cs)
    mb = cs.models_bucket

    # the coordinator's own objects: each JSON document and weights meta through its model (``load`` where
    # the model is a core.messages one, so an error names the object, the key and the field)
    documents: dict[str, type[Any]] = {
        "/stats.json": MergedStatistics,
        "/metrics.json": RunMetrics,
        "/model/VERSION.json": ModelVersion,
    }
    for obj in admin.list(mb, run_prefix(run_id)):
        key, raw = obj.key, admin.get_bytes(mb, obj.key)
        where = f"{mb}/{key}"
        document = next((m for suffix, m in documents.items() if key.endswith(suffix)), None)
        if document is not None:
            load(document, raw, where=where)
            out.count(document)
        elif key.endswith(".npz"):  # round-<kkkk>/global.npz and the published model/global.npz
            load(GlobalWeightsMeta, wio.loads(raw)[1], where=where)
            out.count(GlobalWeightsMeta)
        elif key.endswith("/run.json"):
            RunSpec.model_validate_json(raw)
            out.count(RunSpec)
        elif key.endswith("/record.json"):
            RoundRecord.model_validate_json(raw)
            out.count(RoundRecord)
        elif key.endswith("/secagg.json"):
            AggregationState.model_validate_json(raw)
            out.count(AggregationState)
        elif key.endswith("/sent.json"):
            from lepton_tasks.core.exchange import JobHeader

            for header in json.loads(raw)["jobs"].values():
                JobHeader.model_validate_json(json.dumps(header))
                out.count(JobHeader)
        else:  # not data: the report's HTML, the Keras model
            out.unmodelled.append(where)
    spec = RunSpec.model_validate_json(admin.get_bytes(mb, run_prefix(run_id) + "run.json"))
    for obj in admin.list(mb, f"_registry/{dataset}/"):
        entry = load(RegistryEntry, admin.get_bytes(mb, obj.key), where=obj.key)
        if entry.run_id == run_id:
            out.count(RegistryEntry)

    # what crossed: every object of this run in each site's exchange bucket
    entries = SiteRegistry(cs.site_registry_file).load()
    for site in spec.sites:
        bucket = entries[site].bucket
        for kind in ("jobs", "answers", "refusals"):
            for obj in admin.list(bucket, f"{kind}/{run_id}/"):
                raw = admin.get_bytes(bucket, obj.key)
                if obj.key.endswith(WEIGHTS_SUFFIX):  # the global weights beside a job
                    load(GlobalWeightsMeta, wio.loads(raw)[1], where=f"{bucket}/{obj.key}")
                    out.count(GlobalWeightsMeta)
                    continue
                if obj.key.endswith(UPDATE_SUFFIX):  # a site's update beside its answer
                    load(ExchangeUpdateMeta, wio.loads(raw)[1], where=f"{bucket}/{obj.key}")
                    out.count(ExchangeUpdateMeta)
                    continue
                if not obj.key.endswith(".json"):  # masked inputs (ring elements) beside their message
                    out.unmodelled.append(f"{bucket}/{obj.key}")
                    continue
                message = SignedMessage.model_validate_json(raw)
                out.count(SignedMessage)
                model = payloads[message.header.payload_schema]
                load(model, base64.b64decode(message.payload), where=f"{bucket}/{obj.key}")
                out.count(model)

    # each site's own stack
    for site in spec.sites:
        ss = topo.site(site).settings()
        storage = Storage.from_settings(ss)
        for partner, keys in staged_manifests(storage, ss, dataset, None).items():
            for key in keys:
                load(SignedManifest, storage.get_bytes(ss.staging_bucket, key), where=f"{partner}: {key}")
                out.count(SignedManifest)
        sb, prefix = ss.models_bucket, local_prefix(local_run_id(run_id))
        for obj in storage.list(sb, prefix):
            key = obj.key
            if key.endswith("/plan.json"):
                load(Plan, storage.get_bytes(sb, key), where=key)
                out.count(Plan)
            elif key.endswith(".update"):
                load(UpdateMeta, wio.loads(storage.get_bytes(sb, key))[1], where=key)
                out.count(UpdateMeta)
            elif "eval/" in key and key.endswith(".json"):  # eval/, the benchmarks' local-only-eval/
                load(EvalResult, storage.get_bytes(sb, key), where=key)
                out.count(EvalResult)
            elif "/local/" in key and key.endswith(".npz"):
                load(LocalModelMeta, wio.loads(storage.get_bytes(sb, key))[1], where=key)
                out.count(LocalModelMeta)
            elif key.endswith("/global.npz"):  # the coordinator's global weights as the site got them
                load(GlobalWeightsMeta, wio.loads(storage.get_bytes(sb, key))[1], where=key)
                out.count(GlobalWeightsMeta)
            elif key.endswith("/stats.json"):  # the merged statistics the job carried
                SufficientStats.model_validate_json(storage.get_bytes(sb, key))
                out.count(SufficientStats)
            else:
                out.unmodelled.append(f"{site}:{sb}/{key}")
        files = SiteFiles(ss.site_dir)
        for _ in (r for r in read_log(files.outbound_log) if r.run_id == run_id):
            out.count(OutboundRecord)
        if files.state.exists():
            SiteState(files.state).read()
            out.count(StateDoc)
    return out
