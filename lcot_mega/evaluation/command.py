"""`lcot-mega eval MODEL --data FILE_OR_NAME ... --out DIR` (docs/EVAL.md).

Samples k responses per problem (per seed) through any rollout engine, grades them with the run's reward config,
and writes avg@k / pass@k with bootstrap intervals, uncertain-problem analysis, optional greedy and robustness
passes, per-problem and per-sample JSONL, summary.json, summary.md and plots.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from lcot_mega.config import Config, load_config
from lcot_mega.evaluation.engines import ENGINES, ModelError, opened_engine, resolved_model
from lcot_mega.evaluation.report import SUMMARY, SUMMARY_MD, write_report
from lcot_mega.evaluation.robustness import MISLEADING, REPEATS, Probe
from lcot_mega.evaluation.suite import EvalSettings, run_benchmark, summarize

EXIT_USAGE = 2


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model or checkpoint: avg@k, pass@k, intervals, uncertain problems, robustness probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="HF model directory, Megatron checkpoint directory, checkpoint root or run directory")
    p.add_argument(
        "--data",
        action="append",
        help="benchmark: a .jsonl/.json/.parquet file, reasoning_gym:TASK?args, or a shipped name (champ);"
        " repeat for several (default: the config's data.eval)",
    )
    p.add_argument("--out", required=True, help="output directory (summary.json, summary.md, *.jsonl, plots)")
    p.add_argument("--config", default=None, help="recipe YAML for the prompt template, reward and model dtype")
    p.add_argument("--k", type=int, default=16, help="samples per problem per seed (default 16; the study: 32-64)")
    p.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default 0.6, the study's)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass (default 0.95, the study's)")
    p.add_argument("--max-tokens", type=int, default=None, help="response length limit (default: the config's)")
    p.add_argument("--max-prompt-len", type=int, default=None, help="skip longer prompts (default: no limit)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds, k samples each (default 0)")
    p.add_argument("--greedy", action="store_true", help="also decode greedily once (greedy-vs-sampled flip rate)")
    p.add_argument("--robustness", action="store_true", help="also run the study's adversarial-prefix probe")
    p.add_argument("--probe-text", default=MISLEADING, help=f"the probe's misleading instruction ({MISLEADING!r})")
    p.add_argument("--probe-repeats", type=int, default=REPEATS, help=f"its repetitions (default {REPEATS})")
    p.add_argument("--engine", choices=ENGINES, default="embedded", help="embedded (in-process), served, sglang")
    p.add_argument("--num-engines", type=int, default=1, help="servers to start with --engine served/sglang")
    p.add_argument("--engine-url", action="append", default=[], help="use running server(s) instead (repeatable)")
    p.add_argument("--api-key", default=None, help="bearer token of the --engine-url servers")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="default: model.dtype")
    p.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. reward.fallbacks=[last_number]")
    p.set_defaults(func=run_eval)


def _settings(args: argparse.Namespace, cfg: Config) -> EvalSettings:
    max_tokens = args.max_tokens or cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    probe = Probe(args.probe_text, args.probe_repeats) if args.robustness else None
    return EvalSettings(
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=max_tokens,
        seeds=tuple(args.seeds),
        greedy=args.greedy,
        probe=probe,
        max_prompt_len=args.max_prompt_len or (1 << 30),
        stop=tuple(cfg.rollout.stop),
        template=cfg.data.prompt_template,
        apply_chat_template=cfg.data.apply_chat_template,
    )


def _check_out(out: Path, overwrite: bool) -> None:
    if (out / SUMMARY).exists() and not overwrite:
        raise ModelError(f"{out} already holds an evaluation ({SUMMARY}); pass --overwrite or choose another --out")


def run_eval(args: argparse.Namespace) -> int:
    from lcot_mega.data.benchmarks import load_benchmark

    cfg = load_config(args.config, args.overrides)
    if args.dtype:
        cfg.model.dtype = args.dtype
    cfg.cluster.num_engines = args.num_engines
    out = Path(args.out)
    try:
        settings = _settings(args, cfg)
        _check_out(out, args.overwrite)
        specs = args.data or list(cfg.data.eval)
        if not specs:
            raise ModelError("no benchmark: pass --data FILE_OR_NAME (or a --config whose data.eval names one)")
        benchmarks = [load_benchmark(s, gym_size=cfg.data.gym_eval_size) for s in specs]
        names = [name for name, _ in benchmarks]
        benchmarks = [(n if names.count(n) == 1 else s, ps) for s, (n, ps) in zip(specs, benchmarks, strict=True)]
    except ValueError as e:
        print(f"lcot-mega eval: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        summaries = _evaluate(args, cfg, settings, benchmarks, out)
    except ModelError as e:
        print(f"lcot-mega eval: {e}", file=sys.stderr)
        return EXIT_USAGE
    print((out / SUMMARY_MD).read_text(), end="")
    print(f"lcot-mega eval: {len(summaries)} benchmark(s) written to {out}", file=sys.stderr)
    return 0


def _evaluate(args: argparse.Namespace, cfg: Config, settings: EvalSettings, benchmarks, out: Path) -> dict:
    from transformers import AutoTokenizer

    from lcot_mega.reward.grader import grader_for

    with resolved_model(args.model, out / ".work") as model_dir:
        cfg.model.path = str(model_dir)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.model.trust_remote_code)
        engine = opened_engine(cfg, args.engine, args.engine_url, out / "logs", args.api_key)
        with grader_for(cfg.reward) as grader, engine as eng:
            runs = [run_benchmark(eng, grader, tokenizer, name, problems, settings) for name, problems in benchmarks]
    summaries = {run.name: summarize(run, settings) for run in runs}
    meta = {
        "model": str(args.model),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "engine": "url" if args.engine_url else args.engine,
        "settings": _settings_dict(settings, cfg),
    }
    write_report(out, runs, summaries, meta)
    _plot(out)
    return summaries


def _settings_dict(s: EvalSettings, cfg: Config) -> dict:
    return {
        "k": s.k,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "max_new_tokens": s.max_new_tokens,
        "seeds": list(s.seeds),
        "greedy": s.greedy,
        "probe": None if s.probe is None else {"misleading": s.probe.misleading, "repeats": s.probe.repeats},
        "template": s.template,
        "apply_chat_template": s.apply_chat_template,
        "dtype": cfg.model.dtype,
        "reward": {"fn": cfg.reward.fn, "fallbacks": list(cfg.reward.fallbacks)},
    }


def _plot(out: Path) -> None:
    """Plots are a convenience: a missing matplotlib (or a plotting bug) must not cost the results."""
    try:
        from lcot_mega.observe.plots import plot_eval

        for path in plot_eval(out):
            print(f"lcot-mega eval: wrote {path}", file=sys.stderr)
    except Exception as e:  # the results are already written
        print(f"lcot-mega eval: no plots ({type(e).__name__}: {e})", file=sys.stderr)
