"""`lcot-mega eval`: benchmarks through a rollout engine, graded, summarized with intervals (docs/EVAL.md).

`core` holds the estimators (avg@k, pass@k, bootstrap) and in-training evaluation, `uncertain` the
uncertain-problem analysis, `robustness` the study's probe; `suite`, `report` and `command` run them over
benchmarks and write the report.
"""

from lcot_mega.evaluation.suite import BenchmarkRun, EvalSettings, run_benchmark, summarize

__all__ = ["BenchmarkRun", "EvalSettings", "run_benchmark", "summarize"]
