"""Promote the pilot version to ``production`` once its pilot evidence suffices (scheduled: "not yet" is a clean exit)."""

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote_model(
    registered_model_name: str,
    version: str,
    to_alias: str,
    mlflow_tracking_uri: str,
    promotion_policy: str,
    promotion: Output[Artifact],
) -> str:
    """``seme.pilot.promote`` for ``production`` (``version`` empty: the version holding ``pilot``);
    another alias moves through ``seme.registry.promote``.

    ``promotion_policy``: the promotion policy YAML text (empty: seme's default). The decision is
    ``promote`` (production moved; the former one keeps ``previous-production``), ``wait`` (nothing
    moved: the step succeeds, so a schedule simply tries again) or ``reject`` (the pilot was
    significantly worse: its ``pilot`` alias is removed, production stays). Returns the decision.
    Metadata: ``name``, ``decision``, ``version``, ``production``, ``reasons``, ``p_values``, ``uri``.
    """
    import os
    import tempfile

    from seme import pilot, registry

    tracking_uri = mlflow_tracking_uri or None
    if to_alias != registry.PRODUCTION:
        moves = registry.promote(
            registered_model_name, to=to_alias, version=version or None, tracking_uri=tracking_uri
        )
        promotion.metadata.update(
            {"name": registered_model_name, "decision": "promote", "version": str(moves[to_alias]),
             "alias": to_alias, "uri": f"models:/{registered_model_name}@{to_alias}"}
        )  # fmt: skip
        return "promote"
    policy_path = None
    if promotion_policy.strip():
        fd, policy_path = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(promotion_policy)
    d = pilot.promote(
        registered_model_name, version=version or None, policy=policy_path, tracking_uri=tracking_uri
    )
    word = {"promote": "promoted", "wait": "not yet", "reject": "rejected"}[d.action]
    print(f"{registered_model_name} version {d.version}: {word}: {'; '.join(d.reasons)}")
    promotion.metadata.update(
        {
            "name": registered_model_name,
            "decision": d.action,
            "version": str(d.version or ""),
            "production": str(d.production or ""),
            "alias": to_alias,
            "reasons": d.reasons,
            "p_values": {m: t["p_value"] for m, t in d.tests.items()},
            "uri": f"models:/{registered_model_name}@{to_alias}",
        }
    )
    return d.action
