"""A run directory: resolved config, metrics, checkpoints and eval results of one training run.

Layout: `config.yaml` (the resolved config), `metrics.jsonl` (observe), `checkpoints/step_N` (checkpoint
store), `eval/<source>/step_N.json`. Whether a run resumes is decided here, before any work: a directory
with a checkpoint resumes unless told not to, and nothing that is already there is ever deleted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from lcot_mega.checkpoint.store import CheckpointStore
from lcot_mega.config import Config, config_to_dict, save_config

if TYPE_CHECKING:
    from lcot_mega.observe import MetricsLogger
    from lcot_mega.observe.sinks import MetricSink

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"


class RunDirError(RuntimeError):
    """The run directory and the resume request disagree (raised before any work)."""


@dataclass
class RunDir:
    path: Path
    resuming: bool

    @classmethod
    def open(cls, cfg: Config, resume: bool | None = None) -> RunDir:
        """Prepare `cfg.trainer.run_dir`. resume None: resume when it holds a checkpoint; True: must resume;
        False: must be a fresh run (a directory with checkpoints is refused, not overwritten)."""
        path = Path(cfg.trainer.run_dir)
        has_ckpt = has_checkpoint(path)
        if resume is True and not has_ckpt:
            raise RunDirError(f"--resume: {path} has no checkpoint to resume from ({path / CHECKPOINTS})")
        if resume is False and has_ckpt:
            raise RunDirError(
                f"{path} already holds checkpoints of a run; resume it (--resume) or pick another --run-dir"
            )
        run = cls(path, resuming=has_ckpt)
        path.mkdir(parents=True, exist_ok=True)
        if run.resuming:
            run._note_config_change(cfg)
        else:
            run._set_aside_leftovers()
        save_config(cfg, path / CONFIG_FILE)
        return run

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def metrics_logger(self, cfg: Config, start: int, progress: MetricSink) -> MetricsLogger:
        """The run's metrics logger (enter it): the config's sinks, the resolved config recorded, the records after
        `start` of a resumed run set aside, and `progress` on the console."""
        from lcot_mega.observe import MetricsLogger

        return MetricsLogger(
            self.path, cfg.logging, config_dict=config_to_dict(cfg), resume_step=start or None, extra_sinks=[progress]
        )

    def eval_path(self, source: str, step: int) -> Path:
        return self.path / "eval" / source.replace("/", "_").replace(":", "_") / f"step_{step}.json"

    def _note_config_change(self, cfg: Config) -> None:
        """Keep the config the run had so far when the resumed one differs, and say which keys changed."""
        old_path = self.path / CONFIG_FILE
        if not old_path.is_file():
            return
        old = _flatten(yaml.safe_load(old_path.read_text()) or {})
        new = _flatten(config_to_dict(cfg))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            kept = old_path.with_name(f"config.before-resume-{int(time.time())}.yaml")
            old_path.rename(kept)
            print(f"lcot-mega: resuming with a changed config ({', '.join(changed)}); previous one kept as {kept.name}")

    def _set_aside_leftovers(self) -> None:
        """A run that died before its first checkpoint left metrics; a fresh run keeps them under another name."""
        metrics = self.path / "metrics.jsonl"
        if metrics.exists():
            metrics.rename(metrics.with_name(f"metrics.abandoned-{int(time.time())}.jsonl"))


def has_checkpoint(run_dir: str | Path) -> bool:
    """True when the run directory holds a committed checkpoint."""
    root = Path(run_dir) / CHECKPOINTS
    return root.is_dir() and CheckpointStore(root, clean_stale=False).head() is not None


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
