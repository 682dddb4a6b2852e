"""Observing a run: metric sinks (JSONL always; TensorBoard and wandb optional), the progress line, reading
metrics back, and PNG plots of a run or an evaluation (matplotlib, imported only when plotting). Knows nothing
else of the package; the stable metric names are in docs/METRICS.md.
"""

from lcot_mega.observe.keys import (
    DOCUMENTED_KEYS,
    KEY_PATTERN,
    LABEL_KEYS,
    check_key,
    is_documented,
    is_label,
    key_segment,
)
from lcot_mega.observe.logger import LoggingSettings, MetricsLogger
from lcot_mega.observe.plots import add_plot_parser, load_metrics, plot_dir, plot_eval, plot_run
from lcot_mega.observe.progress import DEFAULT_PROGRESS_KEYS, Progress
from lcot_mega.observe.records import metric_series, read_metrics
from lcot_mega.observe.sinks import METRICS_FILE, WANDB_ID_FILE, JsonlSink, MetricSink, TensorBoardSink, WandbSink

__all__ = [
    "DEFAULT_PROGRESS_KEYS",
    "DOCUMENTED_KEYS",
    "KEY_PATTERN",
    "LABEL_KEYS",
    "METRICS_FILE",
    "WANDB_ID_FILE",
    "JsonlSink",
    "LoggingSettings",
    "MetricSink",
    "MetricsLogger",
    "Progress",
    "TensorBoardSink",
    "WandbSink",
    "add_plot_parser",
    "check_key",
    "is_documented",
    "is_label",
    "key_segment",
    "load_metrics",
    "metric_series",
    "plot_dir",
    "plot_eval",
    "plot_run",
    "read_metrics",
]
