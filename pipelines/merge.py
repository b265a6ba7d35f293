"""``merge_pipeline``: fetch → align → merge → evaluate → gate → register (+ ``pilot``), with an exit handler.

    ExitHandler(record_status):
        ParallelFor(source_uris): fetch_checkpoint          (retries, no cache)
        fetch_checkpoint(base_uri)                          (retries, no cache; "" = no base)
        compute_alignment                                   (1 nvidia.com/gpu, GPU node pool; CPU fallback)
        merge_checkpoints → evaluate_models → validation_gate
        If(gate passed):  register_model(alias="pilot")     (retries, no cache)
        Else:             register_model(alias="")          (registered with seme.gate=failed, no alias)
    record_status: the run's final state (SUCCEEDED / FAILED, and why) recorded in MLflow.

The cluster-facing settings (GPU request, node selector, toleration, secret and config-map env) are
fixed at build time by :class:`ClusterOptions`; ``seme pipeline compile`` exposes them as flags. The
KFP local runner ignores them, so ``seme pipeline run-local`` executes this same pipeline.
"""

from dataclasses import dataclass

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask

from components.align import compute_alignment
from components.evaluate import evaluate_models
from components.fetch import fetch_checkpoint
from components.gate import validation_gate
from components.merge import merge_checkpoints
from components.register import record_status, register_model

PIPELINE_NAME = "seme-merge"
#: Names of the Kubernetes objects the steps read their settings from (infra/k8s/base).
CONFIG_MAP = "seme-config"
S3_SECRET = "seme-s3"
#: MLflow basic-auth credentials of the pipeline's account (the only one that may write the registry)
MLFLOW_SECRET = "seme-mlflow-auth"


@dataclass(frozen=True)
class ClusterOptions:
    """Kubernetes settings compiled into the pipeline (defaults match infra/k8s/overlays/prod/gpu.yaml)."""

    gpu: bool = True
    gpu_node_selector: str = "nvidia.com/gpu.present=true"  # KEY=VALUE
    gpu_toleration: str = "nvidia.com/gpu:Exists:NoSchedule"  # KEY:OPERATOR[:VALUE]:EFFECT
    config_map: str = CONFIG_MAP
    s3_secret: str = S3_SECRET
    mlflow_secret: str = MLFLOW_SECRET
    retries: int = 3
    #: first retry delay of fetch/register (doubles each time); the local runner honours it too,
    #: so ``seme pipeline run-local`` builds the pipeline with a short one
    retry_backoff: str = "30s"

    def node_selector(self) -> tuple[str, str]:
        key, sep, value = self.gpu_node_selector.partition("=")
        if not sep or not key:
            from seme.errors import PipelineError

            raise PipelineError(f"GPU node selector {self.gpu_node_selector!r}: expected KEY=VALUE")
        return key, value

    def toleration(self) -> dict[str, str | None]:
        from seme.errors import PipelineError

        parts = self.gpu_toleration.split(":")
        if len(parts) == 3 and parts[1] == "Exists":
            key, op, value, effect = parts[0], "Exists", None, parts[2]
        elif len(parts) == 4 and parts[1] == "Equal":
            key, op, value, effect = parts
        else:
            raise PipelineError(
                f"GPU toleration {self.gpu_toleration!r}: expected KEY:Exists:EFFECT or KEY:Equal:VALUE:EFFECT"
            )
        if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise PipelineError(f"GPU toleration {self.gpu_toleration!r}: unknown effect {effect!r}")
        return {"key": key, "operator": op, "value": value, "effect": effect}


def _resources(task: PipelineTask, cpu: str, memory: str, cpu_limit: str, memory_limit: str) -> PipelineTask:
    return (
        task.set_cpu_request(cpu)
        .set_memory_request(memory)
        .set_cpu_limit(cpu_limit)
        .set_memory_limit(memory_limit)
    )


def _retried(task: PipelineTask, opts: ClusterOptions) -> PipelineTask:
    """Steps with side effects or flaky I/O: retried with exponential backoff, never served from cache."""
    return task.set_caching_options(False).set_retry(
        num_retries=opts.retries, backoff_duration=opts.retry_backoff, backoff_factor=2
    )


def _settings_env(task: PipelineTask, opts: ClusterOptions, s3: bool, mlflow: bool = False) -> PipelineTask:
    """Endpoints from the seme-config ConfigMap (used when the run leaves them empty); S3 keys from the
    S3 secret; with ``mlflow``, the MLflow account's credentials (steps that write the registry)."""
    kubernetes.use_config_map_as_env(
        task,
        config_map_name=opts.config_map,
        config_map_key_to_env={
            "AWS_ENDPOINT_URL_S3": "AWS_ENDPOINT_URL_S3",
            "AWS_DEFAULT_REGION": "AWS_DEFAULT_REGION",
            "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
        },
    )
    if s3:
        kubernetes.use_secret_as_env(
            task,
            secret_name=opts.s3_secret,
            secret_key_to_env={
                "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
            },
        )
    if mlflow:
        kubernetes.use_secret_as_env(
            task,
            secret_name=opts.mlflow_secret,
            secret_key_to_env={
                "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
            },
        )
    return task


def build_merge_pipeline(opts: ClusterOptions | None = None):
    """The merge pipeline with ``opts`` compiled in (a KFP ``GraphComponent``)."""
    opts = opts or ClusterOptions()

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Fetch, align (SeMe), merge, evaluate, gate and register a merged language model.",
    )
    def merge_pipeline(
        source_uris: list,
        merge_config: str,
        base_uri: str = "",
        eval_suite: str = "zoo",
        eval_limit: int = 0,
        eval_tasks: str = "",
        expert_tasks: dict = {},  # noqa: B006 - a KFP parameter default, never mutated
        gate_policy: str = "",
        registered_model_name: str = "seme-merged",
        output_uri: str = "s3://seme-models/merged",
        mlflow_tracking_uri: str = "",
        s3_endpoint: str = "",
    ):
        """``merge_config``/``gate_policy``: YAML text; the config names the same s3:// URIs as
        ``source_uris``/``base_uri``. ``eval_tasks``: a task file (YAML text or s3:// URI) used
        instead of ``eval_suite``. Empty endpoints: taken from the seme-config ConfigMap."""
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        final = record_status(
            mlflow_tracking_uri=mlflow_tracking_uri,
            registered_model_name=registered_model_name,
            pipeline_run=run_id,
        ).set_display_name("record-status")
        _retried(final, opts)
        _resources(final, "100m", "512Mi", "1", "1Gi")
        _settings_env(final, opts, s3=False, mlflow=True)

        with dsl.ExitHandler(final):
            with dsl.ParallelFor(source_uris) as uri:
                src = fetch_checkpoint(uri=uri, s3_endpoint=s3_endpoint).set_display_name("fetch-source")
                _retried(src, opts)
                _resources(src, "500m", "1Gi", "2", "4Gi")
                _settings_env(src, opts, s3=True)
            base = fetch_checkpoint(uri=base_uri, s3_endpoint=s3_endpoint).set_display_name("fetch-base")
            _retried(base, opts)
            _resources(base, "500m", "1Gi", "2", "4Gi")
            _settings_env(base, opts, s3=True)

            def sources() -> dsl.Collected:
                # one Collected per consumer: KFP 2.17 fails to compile a Collected object used twice
                return dsl.Collected(src.outputs["checkpoint"])

            align = compute_alignment(
                merge_config=merge_config, sources=sources(), base=base.outputs["checkpoint"], device="auto"
            ).set_display_name("align")
            _resources(align, "2", "8Gi", "8", "32Gi")
            if opts.gpu:
                align.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
                kubernetes.add_node_selector(align, *opts.node_selector())
                kubernetes.add_toleration(align, **opts.toleration())
            _settings_env(align, opts, s3=False)

            merged = merge_checkpoints(
                merge_config=merge_config,
                sources=sources(),
                base=base.outputs["checkpoint"],
                alignment=align.outputs["alignment"],
                output_uri=output_uri,
                s3_endpoint=s3_endpoint,
                pipeline_run=run_id,
                device="cpu",
            ).set_display_name("merge")
            _resources(merged, "2", "8Gi", "8", "32Gi")
            _settings_env(merged, opts, s3=True)

            ev = evaluate_models(
                merged=merged.outputs["merged"],
                sources=sources(),
                base=base.outputs["checkpoint"],
                suite=eval_suite,
                limit=eval_limit,
                expert_tasks=expert_tasks,
                device="cpu",
                tasks=eval_tasks,
            ).set_display_name("evaluate")
            _resources(ev, "2", "8Gi", "8", "32Gi")
            _settings_env(ev, opts, s3=False)

            gate = validation_gate(
                report=ev.outputs["report"], merged=merged.outputs["merged"], policy=gate_policy
            ).set_display_name("gate")
            _resources(gate, "500m", "1Gi", "2", "4Gi")
            _settings_env(gate, opts, s3=False)

            register_args = {
                "merged": merged.outputs["merged"],
                "alignment": align.outputs["alignment"],
                "report": ev.outputs["report"],
                "gate_result": gate.outputs["result"],
                "registered_model_name": registered_model_name,
                "mlflow_tracking_uri": mlflow_tracking_uri,
                "pipeline_run": run_id,
            }
            # `== True` builds a KFP condition on the step output, not a Python test
            passed = gate.outputs["passed"] == True
            with dsl.If(passed, name="gate-passed"):
                reg = register_model(gate_passed=True, alias="pilot", **register_args)
                reg.set_display_name("register-pilot")
            with dsl.Else(name="gate-failed"):
                reg_failed = register_model(gate_passed=False, alias="", **register_args)
                reg_failed.set_display_name("register-failed")
            for r in (reg, reg_failed):
                _retried(r, opts)
                _resources(r, "500m", "1Gi", "2", "4Gi")
                _settings_env(r, opts, s3=False, mlflow=True)

    return merge_pipeline


merge_pipeline = build_merge_pipeline()
