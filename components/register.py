"""Register the merged model in MLflow (alias ``pilot`` only after a passed gate); record the run's final status."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register_model(
    merged: Input[Model],
    alignment: Input[Artifact],
    report: Input[Artifact],
    gate_result: Input[Artifact],
    registered_model_name: str,
    mlflow_tracking_uri: str,
    pipeline_run: str,
    gate_passed: bool,
    alias: str,
    model_version: Output[Artifact],
) -> str:
    """Log the merge run and register the merged checkpoint as a new version of ``registered_model_name``.

    ``alias`` (``pilot``) is set only when ``gate_passed``; a failed gate registers the version with
    ``seme.gate = failed`` and no alias. Returns the version number. Metadata: ``name``, ``version``,
    ``alias``, ``run_id``, ``uri``, ``sha256``.
    """
    import json
    import os

    from components.common import model_path
    from seme import registry
    from seme.registry_model import register_version

    tracking_uri = mlflow_tracking_uri or None
    gate_file = os.path.join(gate_result.path, "gate_result.json")
    # register_version refuses a gate result about another checkpoint; pilot is set by the registry
    # itself, and only for a passed gate (the file's verdict)
    passed = gate_passed and registry.gate_passed(gate_file)
    # an MLflow model (transformers + pyfunc) whose location is the prefix the merge step published:
    # the wrapper goes next to the weights, no second copy in MLflow's artifact store
    rv = register_version(
        model_path(merged),
        registered_model_name,
        metrics=os.path.join(report.path, "bundle.json"),
        gate=gate_file,
        alignment_dir=None if alignment.metadata.get("skipped", True) else alignment.path,
        source_uri=merged.metadata.get("uri") or None,
        tags={
            "seme.sources": json.dumps(merged.metadata.get("sources", [])),
            "seme.uri": merged.metadata.get("uri", ""),
        },
        params={"pipeline": {"published_uri": merged.metadata.get("uri", "")}},
        pipeline_run=pipeline_run,
        tracking_uri=tracking_uri,
    )
    version, run_id = rv.version, rv.run_id
    if alias and alias != registry.PILOT and passed:
        registry.set_alias(registered_model_name, alias, version, tracking_uri=tracking_uri)
    model_version.metadata.update(
        {
            "name": registered_model_name,
            "version": str(version),
            "alias": alias if passed else "",
            "run_id": run_id,
            "uri": f"models:/{registered_model_name}/{version}",
            "model_id": rv.model_id,
            "location": rv.location,
            "sha256": merged.metadata.get("sha256", ""),
        }
    )
    return str(version)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def record_status(
    status: dsl.PipelineTaskFinalStatus,
    mlflow_tracking_uri: str,
    registered_model_name: str,
    pipeline_run: str,
) -> None:
    """Exit handler: record the run's final state (and the failing step's message) in MLflow."""
    from components.common import record_pipeline_status

    record_pipeline_status(
        pipeline_run,
        status.state,
        status.error_message or "",
        registered_model_name,
        mlflow_tracking_uri or None,
    )
