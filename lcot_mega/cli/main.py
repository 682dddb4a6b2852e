"""`lcot-mega` command line: `config`, `check`, `train`, `sft`, `eval`, `plot`, `grade`, `convert`, `serve`, `fit`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import yaml

from lcot_mega.config import ConfigError, config_to_dict, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="recipe YAML (only what differs from the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algo.polarity=negative")


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from lcot_mega.cli.check import run_checks

    cfg = load_config(args.config, args.overrides)
    return 0 if run_checks(cfg, run_dir=args.run_dir) else 1


def _cmd_train(args: argparse.Namespace) -> int:
    from lcot_mega.checkpoint.store import CheckpointWriteError
    from lcot_mega.trainer.preflight import check_before_training

    overrides = list(args.overrides) + ([f"trainer.run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = load_config(args.config, overrides)
    check_before_training(cfg)  # before importing the driver's components: a bad config answers in a second
    from lcot_mega.trainer.driver import Halted, train
    from lcot_mega.trainer.run_dir import RunDirError

    try:
        result = train(cfg, resume=args.resume)
    except RunDirError as e:
        print(f"lcot-mega train: {e}", file=sys.stderr)
        return 2
    except Halted as e:
        print(f"lcot-mega train: halted by the guards: {e}", file=sys.stderr)
        return 3
    except CheckpointWriteError as e:
        print(
            f"lcot-mega train: could not write a checkpoint: {e}. The previous checkpoint is intact; fix the cause"
            " (free disk space) and run the same command to resume from it",
            file=sys.stderr,
        )
        return 4
    print(f"lcot-mega train: {result.run_dir} at step {result.last_step}")
    for line in result.eval_summary():
        print(f"lcot-mega train: {line}")
    return 0


def _add_run_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--run-dir", default=None, help="run directory (default: trainer.run_dir)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume", action="store_true", default=None, help="continue from the run directory's newest checkpoint"
    )
    resume.add_argument(
        "--no-resume", dest="resume", action="store_false", help="refuse a run directory that has checkpoints"
    )


def _cmd_sft(args: argparse.Namespace) -> int:
    from lcot_mega.checkpoint.store import CheckpointWriteError
    from lcot_mega.sft.driver import check_sft_config

    overrides = list(args.overrides) + ([f"trainer.run_dir={args.run_dir}"] if args.run_dir else [])
    cfg = load_config(args.config, overrides)
    check_sft_config(cfg)  # a bad config answers before the actor is built
    from lcot_mega.sft.data import SftDataError
    from lcot_mega.sft.driver import sft
    from lcot_mega.trainer.run_dir import RunDirError

    try:
        result = sft(cfg, resume=args.resume)
    except (RunDirError, SftDataError) as e:
        print(f"lcot-mega sft: {e}", file=sys.stderr)
        return 2
    except CheckpointWriteError as e:
        print(f"lcot-mega sft: could not write a checkpoint: {e}. The previous checkpoint is intact", file=sys.stderr)
        return 4
    print(f"lcot-mega sft: {result.run_dir} at step {result.last_step} of {result.total_steps}")
    if result.eval_losses:
        first, last = min(result.eval_losses), max(result.eval_losses)
        print(
            f"lcot-mega sft: held-out loss step {first} {result.eval_losses[first]:.4f} -> step {last}"
            f" {result.eval_losses[last]:.4f} nats/token"
        )
    return 0


def _cmd_grade(args: argparse.Namespace) -> int:
    from lcot_mega.reward import Grader

    with Grader(num_workers=1, timeout_s=args.timeout, fallbacks=args.fallback or ()) as grader:
        (result,) = grader.grade_batch([args.response], [args.answer])
    print(f"correct={result.correct} extracted={result.extracted!r} timed_out={result.timed_out}")
    return 0 if result.correct else 1


def _cmd_serve(args: argparse.Namespace) -> int:
    from lcot_mega.rollout.server import RolloutServer, ServeConfig, check_bind

    try:
        check_bind(args.host, args.api_key)
    except ValueError as e:
        print(f"lcot-mega serve: {e}", file=sys.stderr)
        return 2
    from lcot_mega.rollout.embedded import EmbeddedEngine

    cfg = ServeConfig(
        host=args.host, port=args.port, api_key=args.api_key, allow_weight_updates=not args.disable_weight_updates
    )
    from lcot_mega.cluster.runtime import ROLLOUT_DTYPES

    engine = EmbeddedEngine(args.model_dir, dtype=ROLLOUT_DTYPES[args.dtype])
    server = RolloutServer(engine, cfg, model_path=str(args.model_dir))
    print(f"lcot-mega serve: {args.model_dir} on {server.url}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcot-mega", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="print the resolved config (defaults + YAML + overrides) after validation")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("check", help="validate a config and self-test the installed components")
    _add_config_args(p)
    p.add_argument("--run-dir", default=None, help="also write the resolved config here (default: trainer.run_dir)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "train",
        help="train: rollout -> reward -> advantages -> update -> weight sync, logged",
        epilog="exit status: 0 finished, or stopped by SIGTERM/SIGINT after a checkpoint (the same command resumes);"
        " 2 run directory and --resume/--no-resume disagree; 3 halted by the guards (state saved, see guards.log);"
        " 4 a checkpoint could not be written (the previous one is intact)",
    )
    _add_run_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on (prompt, response) files (the cold start); writes RUN_DIR/hf",
        epilog="exit status: 0 finished (the model is in RUN_DIR/hf), or stopped by SIGTERM/SIGINT after a checkpoint"
        " (the same command resumes); 2 bad config or data, or run directory and --resume/--no-resume disagree;"
        " 4 a checkpoint could not be written (the previous one is intact)",
    )
    _add_run_args(p)
    p.set_defaults(func=_cmd_sft)

    p = sub.add_parser("grade", help="grade one response against a gold answer (math-verify, isolated)")
    p.add_argument("response")
    p.add_argument("answer")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--fallback", action="append", choices=("answer_is", "last_number"))
    p.set_defaults(func=_cmd_grade)

    p = sub.add_parser("serve", help="serve an HF model with the embedded engine over SGLang's HTTP API")
    p.add_argument("model_dir", help="Hugging Face model directory")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; non-loopback needs --api-key")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on every request")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="parameter dtype (model.dtype)"
    )
    p.add_argument(
        "--disable-weight-updates", action="store_true", help="answer 403 on weight-update and memory endpoints"
    )
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser(
        "fit", add_help=False, help="check that a config's actor ranks and engines fit a Ray cluster (--help: options)"
    )
    p.set_defaults(func=lambda args: 2)  # never reached: `main` hands `fit ...` to the fit check's own parser

    _add_convert(sub)
    _add_eval_and_plot(sub)
    return parser


def _add_eval_and_plot(sub: argparse._SubParsersAction) -> None:
    from lcot_mega.evaluation.command import add_eval_parser
    from lcot_mega.observe.plots import add_plot_parser

    add_eval_parser(sub)
    add_plot_parser(sub)


def _add_convert(sub: argparse._SubParsersAction) -> None:
    from lcot_mega.bridge import convert

    p = sub.add_parser("convert", help="convert between Hugging Face and Megatron dist checkpoints")
    kinds = p.add_subparsers(dest="direction", required=True)
    k = kinds.add_parser("hf-to-mcore", help="HF directory -> Megatron dist checkpoint (any TP/PP)")
    convert.add_hf_to_mcore_args(k)
    k.set_defaults(func=convert.run_hf_to_mcore)
    k = kinds.add_parser("mcore-to-hf", help="Megatron dist checkpoint (any TP/PP) -> HF directory")
    convert.add_mcore_to_hf_args(k)
    k.set_defaults(func=convert.run_mcore_to_hf)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fit"]:  # its own parser, options included (`lcot-mega fit --help`)
        from lcot_mega.cluster import fit

        return fit.main(argv[1:])
    parser = build_parser()
    # Overrides may come after options too (`train CFG --resume rollout.max_new_tokens=16384`): argparse stops
    # filling a positional list at the first option, so dotted overrides left over are taken here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"lcot-mega: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
