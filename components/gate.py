"""The validation gate (Great Expectations) over the evaluation report."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def validation_gate(report: Input[Artifact], policy: str, result: Output[Artifact]) -> NamedTuple(
    "GateOutputs", passed=bool
):
    """Run ``seme.gates.run_gate`` on the evaluation report; ``passed`` drives the pipeline's branch.

    ``policy`` is the policy YAML text (empty: the default policy). A failed gate is not a failed
    step: the step succeeds with ``passed = False`` and the pipeline registers the version as failed.
    Metadata: ``passed``, ``sha256``.
    """
    import os
    import tempfile
    from collections import namedtuple

    from seme.gates import run_gate

    from components.common import artifact_digest

    policy_path = None
    if policy.strip():
        fd, policy_path = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(policy)
    verdict = run_gate(report.path, policy_path, result.path)
    result.metadata.update({"passed": bool(verdict.passed), "sha256": artifact_digest(result.path)})
    return namedtuple("GateOutputs", ["passed"])(bool(verdict.passed))
