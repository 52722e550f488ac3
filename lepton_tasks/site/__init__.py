"""The software a partner runs at its own site (DESIGN.md, "coordinator + sites").

- :mod:`lepton_tasks.site.enrollment`: import the coordinator's enrollment bundle, create the site's own
  signing key in the site's Vault, write the policy skeleton with the coordinator's key pinned;
- :mod:`lepton_tasks.site.jobs`: poll the exchange bucket, authenticate each job, decide by the site's policy,
  answer or refuse (signed), every outbound object logged first;
- :mod:`lepton_tasks.site.state`: the site-local state (seen message ids, rounds, handled keys), 0600;
- :mod:`lepton_tasks.site.local_run`: the one-partner local run the trainer works from, the trainer's job;
- :mod:`lepton_tasks.site.training`: the real ``run_trainer`` (statistics of the staged drops; train and
  evaluate with the trainer on the site's own staged data) and what the site's job DAG
  (``dags/lepton_site.py``) calls: ``verify_job``, ``answer_job``.

The site's files live in ``settings.site_dir`` (:class:`lepton_tasks.site.enrollment.SiteFiles`).

Nothing here imports Airflow: the site's DAGs call these functions.
"""
