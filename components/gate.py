"""The validation gate (Great Expectations) over the evaluation report; the model only for weight checks."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validation_gate(
    report: Input[Artifact], manifest: Input[Artifact], policy: str, result: Output[Artifact]
) -> NamedTuple("GateOutputs", passed=bool):
    """Run the gate on the evaluation report's ``bundle.json``; ``passed`` drives the branch.

    ``policy`` is the policy YAML text (empty: the default policy). The model is not an input, only
    its ``seme_manifest.json`` (``manifest``), which binds the verdict to the checkpoint it judged; a
    policy with weight checks needs the pipeline compiled with ``--gate-weight-check``
    (:func:`validation_gate_weights`). A failed gate is not a failed step: the step succeeds with
    ``passed = False`` and the pipeline registers the version as failed. Metadata: ``passed``, ``sha256``.
    """
    from collections import namedtuple

    from components.common import artifact_digest, gate_step

    passed = gate_step(report.path, policy, result.path, manifest.path, weights=False)
    result.metadata.update({"passed": passed, "sha256": artifact_digest(result.path)})
    return namedtuple("GateOutputs", ["passed"])(passed)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validation_gate_weights(
    report: Input[Artifact], merged: Input[Model], policy: str, result: Output[Artifact]
) -> NamedTuple("GateOutputs", passed=bool):
    """:func:`validation_gate` plus the policy's weight checks on the merged checkpoint (``merged``)."""
    from collections import namedtuple

    from components.common import artifact_digest, gate_step, model_path

    passed = gate_step(report.path, policy, result.path, model_path(merged), weights=True)
    result.metadata.update({"passed": passed, "sha256": artifact_digest(result.path)})
    return namedtuple("GateOutputs", ["passed"])(passed)
