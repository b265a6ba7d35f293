"""SeMe, the semantic merge method (docs/seme-method.md), one module per part of the method.

Read in this order:

- ``settings``: the method's parameters (``select_ratio``, ``compute``, ``erase``, ``density``, …).
- ``bases``: vocabulary-defined semantics: semantic bases Ŝ, the semantic metric F = ŜᵀŜ, the
  token subset T (§2).
- ``transform``: the semantics-preservative transformations applied to a checkpoint, one tensor at a
  time (``ModelView``), and task vectors in the anchor's coordinates (§3).
- ``alignment``: estimating those transformations (vocabulary map, residual rotation, unit
  permutations) and, in the same layer-by-layer pass, the Select statistics (§3).
- ``artifact``: the alignment artifact ``seme align`` writes and ``seme merge --alignment`` reads (§7).
- ``select``: which sources take part in each module (semantic displacement σ, §4).
- ``compute``: their coefficients λ (§4).
- ``erase``: TIES in semantic coordinates (§5), with its fused CPU kernel in ``erase_kernel``.
- ``merger``: the driver the executor calls per output tensor (Select → Compute → Erase, §4-§6).
- ``diagnostics``: data-free per-layer knowledge stability (§8).

Importing this package imports nothing heavy; ``seme.semantic.merger`` registers the ``seme`` method.
"""
