"""`lcot-mega eval`: benchmarks through a rollout engine, graded, summarized with intervals (docs/EVAL.md).

The estimators live in `lcot_mega.evaluate` (avg@k, pass@k, bootstrap) and `lcot_mega.uncertain`; the probe in
`lcot_mega.robustness`. This package runs them over benchmarks and writes the report.
"""

from lcot_mega.evaluation.suite import BenchmarkRun, EvalSettings, run_benchmark, summarize

__all__ = ["BenchmarkRun", "EvalSettings", "run_benchmark", "summarize"]
