"""The validation gate (Great Expectations) over the evaluation report."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validation_gate(
    report: Input[Artifact], merged: Input[Model], policy: str, result: Output[Artifact]
) -> NamedTuple("GateOutputs", passed=bool):
    """Run ``seme.gates.run_gate`` on the evaluation report's ``bundle.json``; ``passed`` drives the branch.

    ``policy`` is the policy YAML text (empty: the default policy); weight checks read ``merged``. A failed gate is not a failed
    step: the step succeeds with ``passed = False`` and the pipeline registers the version as failed.
    Metadata: ``passed``, ``sha256``.
    """
    import os
    import tempfile
    from collections import namedtuple

    from components.common import artifact_digest
    from seme.gates import run_gate

    policy_path = None
    if policy.strip():
        fd, policy_path = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(policy)
    verdict = run_gate(
        os.path.join(report.path, "bundle.json"), policy_path, result.path, model_dir=merged.path
    )
    result.metadata.update({"passed": bool(verdict.passed), "sha256": artifact_digest(result.path)})
    return namedtuple("GateOutputs", ["passed"])(bool(verdict.passed))
