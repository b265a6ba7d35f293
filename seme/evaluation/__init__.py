"""Evaluation: task files (built-in suites and a user's own), paired comparisons of models.

``evaluate(model_dir, suite | task_file=...)`` returns the metrics dict (interfaces.md: metrics JSON);
``write_metrics`` writes it atomically; ``format_table`` renders it for stdout;
``compare`` (seme.evaluation.compare) gives paired differences with CIs and p-values.
"""

from seme.evaluation.suites import (
    SUITES,
    Suite,
    Task,
    evaluate,
    format_table,
    get_suite,
    open_tasks,
    write_metrics,
)

__all__ = ["SUITES", "Suite", "Task", "evaluate", "format_table", "get_suite", "open_tasks", "write_metrics"]
