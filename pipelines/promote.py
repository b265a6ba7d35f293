"""``promote_pipeline``: move ``pilot`` to ``production`` once the pilot evidence suffices.

One step with retries, meant to run on a schedule: the promotion policy decides from the evidence
``seme pilot record`` logged (duration, samples, "not significantly worse" per metric). Not enough
evidence yet is a clean "not yet" (the step succeeds, nothing moves); a significantly worse pilot
loses its alias and production stays. The registry still refuses a version whose gate did not pass,
and keeps the former production version as ``previous-production``. Rollback stays a CLI action
(``seme rollback NAME``).
"""

from kfp import dsl

from components.promote import promote_model
from pipelines.merge import ClusterOptions, _resources, _retried, _settings_env

PIPELINE_NAME = "seme-promote"


def build_promote_pipeline(opts: ClusterOptions | None = None):
    """The promote pipeline (a KFP ``GraphComponent``)."""
    opts = opts or ClusterOptions()

    @dsl.pipeline(
        name=PIPELINE_NAME, description="Promote the pilot version of a merged model to production."
    )
    def promote_pipeline(
        registered_model_name: str = "seme-merged",
        version: str = "",
        to_alias: str = "production",
        mlflow_tracking_uri: str = "",
        promotion_policy: str = "",
    ):
        """``version`` empty: the version that holds ``pilot``; ``promotion_policy``: YAML text (empty: default)."""
        task = promote_model(
            registered_model_name=registered_model_name,
            version=version,
            to_alias=to_alias,
            mlflow_tracking_uri=mlflow_tracking_uri,
            promotion_policy=promotion_policy,
        ).set_display_name("promote")
        _retried(task, opts)
        _resources(task, "100m", "512Mi", "1", "1Gi")
        _settings_env(task, opts, s3=False, mlflow=True)

    return promote_pipeline


promote_pipeline = build_promote_pipeline()
