"""Evaluation suites for the zoo and merged models: held-out task metrics and general retention.

``evaluate(model_dir, suite)`` returns the metrics dict (interfaces.md: metrics JSON);
``write_metrics`` writes it atomically; ``format_table`` renders it for stdout.
"""

from seme.evaluation.suites import SUITES, Suite, Task, evaluate, format_table, get_suite, write_metrics

__all__ = ["SUITES", "Suite", "Task", "evaluate", "format_table", "get_suite", "write_metrics"]
