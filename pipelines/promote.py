"""``promote_pipeline``: move ``pilot`` to ``production`` after the pilot period.

One step with retries; the registry refuses a version that does not hold ``pilot`` (or, when named
explicitly, has not passed its gate), and keeps the former production version as
``previous-production``. Rollback stays a CLI action (``seme rollback NAME``).
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
    ):
        """``version`` empty: the version that holds ``pilot``."""
        task = promote_model(
            registered_model_name=registered_model_name,
            version=version,
            to_alias=to_alias,
            mlflow_tracking_uri=mlflow_tracking_uri,
        ).set_display_name("promote")
        _retried(task, opts)
        _resources(task, "100m", "512Mi", "1", "1Gi")
        _settings_env(task, opts, s3=False, mlflow=True)

    return promote_pipeline


promote_pipeline = build_promote_pipeline()
