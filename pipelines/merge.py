"""``merge_pipeline``: fetch → align → merge → evaluate → gate → register (+ ``pilot``), with an exit handler.

    [--pvc: CreatePVC (one volume per run)]
    ExitHandler(record_status):
        ParallelFor(source_uris): fetch_checkpoint          (retries, no cache)
        fetch_checkpoint(base_uri)                          (retries, no cache; "" = no base)
        compute_alignment                                   (GPU steps: 1 nvidia.com/gpu, GPU node pool)
        merge_checkpoints → evaluate_models → validation_gate[_weights]
        If(gate passed):  register_model(alias="pilot")     (retries, no cache)
        Else:             register_model(alias="")          (registered with seme.gate=failed, no alias)
    record_status: the run's final state (SUCCEEDED / FAILED, and why) recorded in MLflow.
    [--pvc: DeletePVC after a run that succeeded; a failed run keeps its volume for inspection]

The cluster-facing settings are fixed at build time by :class:`ClusterOptions`; ``seme pipeline
compile`` exposes them as flags: the image (every step), which steps get a GPU (default: align, plus
merge for SeMe and the SVD family), pod requests sized for the model (``--model-size``), the
``--pvc SIZE`` mode (checkpoints stay on a volume mounted by every model-reading step instead of
travelling through KFP's artifact store), and whether the gate reads the weights. The KFP local
runner ignores the Kubernetes parts, so ``seme pipeline run-local`` executes this same pipeline.
"""

from dataclasses import dataclass

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask

from components.align import compute_alignment
from components.common import IMAGE, VOLUME_MOUNT
from components.evaluate import evaluate_models
from components.fetch import fetch_checkpoint
from components.gate import validation_gate, validation_gate_weights
from components.merge import merge_checkpoints
from components.register import record_status, register_model

PIPELINE_NAME = "seme-merge"
#: Names of the Kubernetes objects the steps read their settings from (infra/k8s/base).
CONFIG_MAP = "seme-config"
S3_SECRET = "seme-s3"
#: MLflow basic-auth credentials of the pipeline's account (the only one that may write the registry)
MLFLOW_SECRET = "seme-mlflow-auth"
#: Steps that can run on a GPU, and the methods whose merge step does GPU-sized work (SeMe's Erase,
#: the SVD family's per-matrix decompositions).
GPU_STEPS = ("align", "merge", "evaluate")
GPU_MERGE_METHODS = frozenset({"seme", "tsv", "iso_c", "iso_cts", "wudi", "cart"})

#: Pod requests/limits per model size: {step: (cpu, memory, cpu limit, memory limit)} (docs/runbook.md
#: "Sizing"). Memory covers the step's peak RSS at that size with headroom; fetch/gate/register are
#: small I/O steps whose needs do not grow with the model in --pvc mode.
SIZES: dict[str, dict[str, tuple[str, str, str, str]]] = {
    "tiny": {"fetch": ("500m", "1Gi", "2", "4Gi"), "align": ("2", "8Gi", "8", "32Gi"),
             "merge": ("2", "8Gi", "8", "32Gi"), "evaluate": ("2", "8Gi", "8", "32Gi")},
    "1b": {"fetch": ("1", "2Gi", "4", "8Gi"), "align": ("4", "16Gi", "8", "32Gi"),
           "merge": ("4", "16Gi", "16", "32Gi"), "evaluate": ("4", "16Gi", "8", "32Gi")},
    "7b": {"fetch": ("2", "4Gi", "4", "8Gi"), "align": ("8", "48Gi", "16", "96Gi"),
           "merge": ("16", "48Gi", "16", "96Gi"), "evaluate": ("8", "48Gi", "16", "96Gi")},
    "70b": {"fetch": ("4", "8Gi", "8", "16Gi"), "align": ("16", "192Gi", "32", "384Gi"),
            "merge": ("32", "128Gi", "32", "256Gi"), "evaluate": ("16", "192Gi", "32", "384Gi")},
}  # fmt: skip


def default_gpu_steps(method: str | None) -> frozenset[str]:
    """align always; merge for SeMe and the SVD family; evaluate never by default (it uses a GPU when
    its pod has one: ``device="auto"``)."""
    return frozenset({"align", "merge"} if method in GPU_MERGE_METHODS else {"align"})


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
    image: str = IMAGE
    #: steps with a GPU request; None: :func:`default_gpu_steps` of ``method`` (empty with gpu=False)
    gpu_steps: frozenset[str] | None = None
    method: str | None = None
    #: "SIZE" (e.g. "200Gi"): a PersistentVolumeClaim per run holds every checkpoint; None: artifact store
    pvc_size: str | None = None
    pvc_storage_class: str = ""
    model_size: str = "tiny"
    gate_weight_check: bool = False

    def steps_with_gpu(self) -> frozenset[str]:
        from seme.errors import PipelineError

        if not self.gpu:
            return frozenset()
        steps = default_gpu_steps(self.method) if self.gpu_steps is None else frozenset(self.gpu_steps)
        unknown = sorted(steps - set(GPU_STEPS))
        if unknown:
            raise PipelineError(
                f"--gpu-steps: unknown step(s) {', '.join(unknown)}; choose from {', '.join(GPU_STEPS)}"
            )
        return steps

    def requests(self, step: str) -> tuple[str, str, str, str]:
        from seme.errors import PipelineError

        if self.model_size not in SIZES:
            raise PipelineError(f"--model-size {self.model_size!r}: choose one of {', '.join(SIZES)}")
        return SIZES[self.model_size][step]

    def check_image(self) -> None:
        """``REPO[:TAG][@sha256:<64 hex>]``: refuse what a registry would refuse at pull time."""
        import re

        from seme.errors import PipelineError

        if not re.fullmatch(r"[a-z0-9]+(?:[._/:-][a-zA-Z0-9_.-]+)*(?:@sha256:[0-9a-f]{64})?", self.image) or (
            "@" in self.image and not re.search(r"@sha256:[0-9a-f]{64}$", self.image)
        ):
            raise PipelineError(f"--image {self.image!r}: expected REPOSITORY[:TAG][@sha256:<64 hex digits>]")

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


def _on_gpu(task: PipelineTask, opts: ClusterOptions) -> None:
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(1)
    kubernetes.add_node_selector(task, *opts.node_selector())
    kubernetes.add_toleration(task, **opts.toleration())


def build_merge_pipeline(opts: ClusterOptions | None = None):
    """The merge pipeline with ``opts`` compiled in (a KFP ``GraphComponent``)."""
    opts = opts or ClusterOptions()
    opts.check_image()
    gpu = opts.steps_with_gpu()
    for step in ("fetch", "align", "merge", "evaluate"):
        opts.requests(step)  # an unknown --model-size fails before anything is built

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
        volume = {"volume_dir": VOLUME_MOUNT} if opts.pvc_size else {}
        readers: list[PipelineTask] = []  # steps that read checkpoints: they mount the volume

        def step(task: PipelineTask, name: str, reads_models: bool = False) -> PipelineTask:
            task.set_display_name(name).set_container_image(opts.image)
            if reads_models:
                readers.append(task)
            return task

        final = step(
            record_status(
                mlflow_tracking_uri=mlflow_tracking_uri,
                registered_model_name=registered_model_name,
                pipeline_run=run_id,
            ),
            "record-status",
        )
        _retried(final, opts)
        _resources(final, "100m", "512Mi", "1", "1Gi")
        _settings_env(final, opts, s3=False, mlflow=True)

        with dsl.ExitHandler(final) as body:
            with dsl.ParallelFor(source_uris) as uri:
                src = step(fetch_checkpoint(uri=uri, s3_endpoint=s3_endpoint, **volume), "fetch-source", True)
                _retried(src, opts)
                _resources(src, *opts.requests("fetch"))
                _settings_env(src, opts, s3=True)
            base = step(fetch_checkpoint(uri=base_uri, s3_endpoint=s3_endpoint, **volume), "fetch-base", True)
            _retried(base, opts)
            _resources(base, *opts.requests("fetch"))
            _settings_env(base, opts, s3=True)

            def sources() -> dsl.Collected:
                # one Collected per consumer: KFP 2.17 fails to compile a Collected object used twice
                return dsl.Collected(src.outputs["checkpoint"])

            align = step(
                compute_alignment(
                    merge_config=merge_config,
                    sources=sources(),
                    base=base.outputs["checkpoint"],
                    device="auto",
                ),
                "align",
                True,
            )
            _resources(align, *opts.requests("align"))
            _settings_env(align, opts, s3=False)

            merged = step(
                merge_checkpoints(
                    merge_config=merge_config,
                    sources=sources(),
                    base=base.outputs["checkpoint"],
                    alignment=align.outputs["alignment"],
                    output_uri=output_uri,
                    s3_endpoint=s3_endpoint,
                    pipeline_run=run_id,
                    device="auto" if "merge" in gpu else "cpu",
                    **volume,
                ),
                "merge",
                True,
            )
            _resources(merged, *opts.requests("merge"))
            _settings_env(merged, opts, s3=True)

            ev = step(
                evaluate_models(
                    merged=merged.outputs["merged"],
                    sources=sources(),
                    base=base.outputs["checkpoint"],
                    suite=eval_suite,
                    limit=eval_limit,
                    expert_tasks=expert_tasks,
                    device="auto",  # a GPU when the pod has one
                    tasks=eval_tasks,
                ),
                "evaluate",
                True,
            )
            _resources(ev, *opts.requests("evaluate"))
            _settings_env(ev, opts, s3=False)
            for name, task in (("align", align), ("merge", merged), ("evaluate", ev)):
                if name in gpu:
                    _on_gpu(task, opts)

            if opts.gate_weight_check:
                gate = step(
                    validation_gate_weights(
                        report=ev.outputs["report"], merged=merged.outputs["merged"], policy=gate_policy
                    ),
                    "gate",
                    True,
                )
                _resources(gate, *opts.requests("fetch"))
            else:  # metrics only: the model does not travel to the gate, only its manifest (its identity)
                gate = step(
                    validation_gate(
                        report=ev.outputs["report"], manifest=merged.outputs["manifest"], policy=gate_policy
                    ),
                    "gate",
                )
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
                reg = step(
                    register_model(gate_passed=True, alias="pilot", **register_args), "register-pilot", True
                )
            with dsl.Else(name="gate-failed"):
                reg_failed = step(
                    register_model(gate_passed=False, alias="", **register_args), "register-failed", True
                )
            for r in (reg, reg_failed):
                _retried(r, opts)
                _resources(r, "500m", "1Gi", "2", "4Gi")
                _settings_env(
                    r, opts, s3=True, mlflow=True
                )  # writes the MLflow wrapper next to the published weights

        if opts.pvc_size:
            # One volume per run, created before the first fetch and deleted after the exit handler.
            sc = {"storage_class_name": opts.pvc_storage_class} if opts.pvc_storage_class else {}
            pvc = kubernetes.CreatePVC(
                pvc_name_suffix="-seme", access_modes=["ReadWriteOnce"], size=opts.pvc_size, **sc
            ).set_display_name("create-volume")
            for task in readers:
                kubernetes.mount_pvc(task, pvc_name=pvc.outputs["name"], mount_path=VOLUME_MOUNT)
            # after a run that succeeded; a failed run keeps its volume for inspection (kubectl delete pvc)
            kubernetes.DeletePVC(pvc_name=pvc.outputs["name"]).after(body).set_display_name("delete-volume")

    return merge_pipeline


merge_pipeline = build_merge_pipeline()
