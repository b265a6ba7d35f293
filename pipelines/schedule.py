"""Recurring runs of the merge pipeline on a Kubeflow Pipelines server (``seme pipeline schedule``)."""

import os
import tempfile
from pathlib import Path
from typing import Any

_DESCRIPTIONS = {
    "merge": "seme merge pipeline: merge, evaluate, gate, register (pilot)",
    "promote": "seme promote pipeline: pilot -> production once the pilot evidence suffices",
}


def check_cron(cron: str) -> str:
    """KFP's scheduler takes 6-field cron (``second minute hour day-of-month month day-of-week``)."""
    from seme.errors import PipelineError

    fields = cron.split()
    if len(fields) != 6:
        raise PipelineError(
            f"cron {cron!r} has {len(fields)} fields; KFP needs 6 (second minute hour day month weekday), "
            'e.g. "0 0 3 * * *" for 03:00 every day'
        )
    return " ".join(fields)


def schedule(
    host: str,
    cron: str,
    params: dict[str, Any],
    *,
    job_name: str = "seme-merge-nightly",
    experiment: str = "seme",
    namespace: str | None = None,
    service_account: str = "seme-pipeline-runner",
    package: str | os.PathLike | None = None,
    max_concurrency: int = 1,
    existing_token: str | None = None,
    pipeline: str = "merge",
) -> dict[str, Any]:
    """Create a recurring run of ``pipeline`` (merge | promote) with ``params``; return the server's record.

    ``package``: a compiled IR YAML (default: compile the pipeline with default options now).
    ``no_catchup`` is set: a scheduler that was down runs the merge once, not once per missed slot.
    """
    import contextlib
    import io

    import kfp
    import kfp_server_api
    import urllib3

    from seme.errors import PipelineError

    cron = check_cron(cron)
    with tempfile.TemporaryDirectory(prefix="seme-schedule-") as tmp:
        if package is None:
            from pipelines.compile import compile_pipeline

            package = compile_pipeline(pipeline, Path(tmp) / f"seme-{pipeline}.yaml")
        elif not Path(package).is_file():
            raise PipelineError(f"{package}: pipeline package not found (seme pipeline compile writes one)")
        try:
            client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=existing_token)
            with contextlib.redirect_stdout(io.StringIO()):  # the client prints a UI link to stdout
                exp = client.create_experiment(experiment, namespace=namespace)
            job = client.create_recurring_run(
                experiment_id=exp.experiment_id,
                job_name=job_name,
                description=_DESCRIPTIONS[pipeline],
                cron_expression=cron,
                max_concurrency=max_concurrency,
                no_catchup=True,
                params=params,
                pipeline_package_path=str(package),
                service_account=service_account,
            )
        except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as e:
            # name the host, never the token
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PipelineError(f"KFP server {host}: could not create the recurring run ({first})") from None
    return {
        "recurring_run_id": job.recurring_run_id,
        "name": job.display_name,
        "experiment_id": exp.experiment_id,
        "cron": cron,
        "host": host,
    }
