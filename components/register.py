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
    merge_config: str,
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
    from seme import registry

    run_id = registry.log_merge_run(
        merged_dir=merged.path,
        config=merge_config,
        eval_dir=report.path,
        gate_dir=gate_result.path,
        alignment_dir=None if alignment.metadata.get("skipped", True) else alignment.path,
        pipeline_run=pipeline_run,
        tracking_uri=mlflow_tracking_uri or None,
    )
    version = registry.register_model(
        registered_model_name,
        run_id=run_id,
        model_uri=merged.metadata.get("uri") or merged.path,
        gate_passed=gate_passed,
        tracking_uri=mlflow_tracking_uri or None,
    )
    if alias and gate_passed:
        registry.set_alias(registered_model_name, version, alias, tracking_uri=mlflow_tracking_uri or None)
    model_version.metadata.update(
        {
            "name": registered_model_name,
            "version": str(version),
            "alias": alias if gate_passed else "",
            "run_id": run_id,
            "uri": f"models:/{registered_model_name}/{version}",
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
    from seme import registry

    registry.record_pipeline_status(
        pipeline_run=pipeline_run,
        state=status.state,
        error=status.error_message or "",
        registered_model_name=registered_model_name,
        tracking_uri=mlflow_tracking_uri or None,
    )
