"""Promote the version holding ``pilot`` to ``production`` (the registry's checks apply)."""

from kfp import dsl
from kfp.dsl import Artifact, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote_model(
    registered_model_name: str,
    version: str,
    to_alias: str,
    mlflow_tracking_uri: str,
    promotion: Output[Artifact],
) -> str:
    """``seme.registry.promote``: ``version`` empty means the version holding ``pilot``.

    The former production version keeps ``previous-production`` (rollback: ``seme rollback``).
    Returns the promoted version. Metadata: ``name``, ``version``, ``alias``, ``uri``.
    """
    from seme import registry

    moves = registry.promote(
        registered_model_name, to=to_alias, version=version or None, tracking_uri=mlflow_tracking_uri or None
    )
    promoted = moves[to_alias]
    promotion.metadata.update(
        {
            "name": registered_model_name,
            "version": str(promoted),
            "alias": to_alias,
            "uri": f"models:/{registered_model_name}@{to_alias}",
            "previous": str(moves.get("previous-production") or ""),
        }
    )
    return str(promoted)
