"""Prompt sources (JSONL/parquet files, reasoning-gym generators), prompt rendering, and the training stream.

`build_data(cfg.data, tokenizer, cfg.trainer.seed)` is what the driver calls; `load_benchmark(spec)` is what
`lcot-mega eval --data` calls. docs/DATA.md describes the file schema and the `reasoning_gym:TASK?args` sources.
"""

from lcot_mega.data.benchmarks import BENCHMARKS, load_benchmark, register_benchmark
from lcot_mega.data.build import build_data, load_problems
from lcot_mega.data.choices import shuffle_choices
from lcot_mega.data.files import load_problem_file, read_rows, write_jsonl
from lcot_mega.data.gym import GymSpec, generate_problems, generator_seed, parse_gym_spec
from lcot_mega.data.problems import Problem, SourceReport, normalize_problem
from lcot_mega.data.stream import PromptStream
from lcot_mega.data.templates import render_prompts, render_texts

__all__ = [
    "BENCHMARKS",
    "GymSpec",
    "Problem",
    "PromptStream",
    "SourceReport",
    "build_data",
    "generate_problems",
    "generator_seed",
    "load_benchmark",
    "load_problem_file",
    "load_problems",
    "normalize_problem",
    "parse_gym_spec",
    "read_rows",
    "register_benchmark",
    "render_prompts",
    "render_texts",
    "shuffle_choices",
    "write_jsonl",
]
