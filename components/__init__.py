"""Kubeflow Pipelines v2 components: one small module per step, each a thin call into ``seme``.

Every component is a lightweight ``@dsl.component`` whose ``base_image`` is the project image
(:data:`components.common.IMAGE`). The image already holds ``seme``, ``kfp`` and this package, so
the components install nothing at run time and import ``seme`` inside their function body (KFP ships
only the function's source to the pod).
"""
