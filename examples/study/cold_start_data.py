"""Long chains of thought written by program: the cold-start SFT data of the study's setting, offline, seeded.

    python examples/study/cold_start_data.py --out runs/cold_start/train.jsonl [--n 2000] [--seed 0]
        [--tasks chain_sum products] [--error-rate 0.25] [--for sft|rl]

Each row is `{"prompt", "response", "answer", "task"}` for `lcot-mega sft` (sft.chat_template renders the prompt
as the user turn). The prompt is the reasoning-gym question in the study's template ("... Let's think step by
step and output the final answer within \\boxed{}."); the response is `<think> ... </think>` and then
`\\boxed{answer}`: the working digit by digit (columns, carries and borrows, partial products), a check by
another route, and in about `--error-rate` of the traces one step first done wrong, caught by that check of the
step, and redone: the wrong-step-then-correction pattern of long chains of thought. Every answer is computed, and
every trace's boxed answer is verified against reasoning-gym's (the script fails otherwise).

With `--for rl` each row is a prompt-file row for `lcot-mega train` instead: `{"prompt": the question, "answer",
"solution": the trace, "source": task}` (data.prompt_template wraps the question): the offline solutions that
`algo.injection` puts into hard groups. Use another `--seed` than the SFT data's.

With `--for rl --run-config CONFIG --run-seed N [--set KEY=VALUE ...]` the rows are instead the very problems a
`lcot-mega train CONFIG trainer.seed=N` run trains on (its reasoning-gym source, eval questions held out), in the
same order and with the same uids, each with its trace: a file named after the source (e.g. chain_sum.jsonl) then
replaces that source in data.train and the run draws from the same prompt stream as without it, so a run with
`algo.injection.enabled=true` differs from its control run by the injection and what follows from it (a group
given a solution is informative, so dynamic sampling refills less and the two runs soon stand at other prompts).

Tasks: chain_sum (2-4 terms of 2-3 digits, + and -) and products (two factors of 2-3 digits): 160-890 SmolLM2
tokens a trace, 93% of them 200-800 (600 traces, seed 0). The RL config that trains on top grades with
`reward.require_think_close: true`, as the study did.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

STUDY_TEMPLATE = "{problem} Let's think step by step and output the final answer within \\boxed{{}}."
TASK_ARGS = {
    "chain_sum": {"min_terms": 2, "max_terms": 4, "min_digits": 2, "max_digits": 3},
    "products": {"min_digits": 2, "max_digits": 3},
}
ONES = ["ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions"]


@dataclass
class Trace:
    """Lines of one chain of thought; `slip` says whether the trace may still make its one deliberate error."""

    rng: random.Random
    slip: bool
    lines: list[str] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.lines.append(text)


def _digits(n: int) -> list[int]:
    """Digits of n >= 0, ones first."""
    return [int(c) for c in reversed(str(n))]


def column_add(t: Trace, a: int, b: int) -> int:
    """a + b (both >= 0) column by column, carries said out loud."""
    da, db = _digits(a), _digits(b)
    carry, out = 0, []
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        s = x + y + carry
        extra = f" plus the carried {carry}" if carry else ""
        note = f", write {s % 10} and carry 1" if s >= 10 else ""
        t.say(f"  {ONES[i]}: {x} + {y}{extra} = {s}{note}.")
        out.append(s % 10)
        carry = s // 10
    if carry:
        t.say(f"  The last carry {carry} becomes the leading digit.")
        out.append(carry)
    result = int("".join(map(str, reversed(out))))
    assert result == a + b
    return result


def column_sub(t: Trace, a: int, b: int) -> int:
    """a - b (a >= b >= 0) column by column, borrows said out loud."""
    da, db = _digits(a), _digits(b)
    borrow, out = 0, []
    for i in range(len(da)):
        x, y = da[i] - borrow, (db[i] if i < len(db) else 0)
        shown = f"{da[i]} (minus the borrowed 1, so {x})" if borrow else f"{da[i]}"
        if x < y:
            t.say(f"  {ONES[i]}: {shown} is less than {y}, so borrow 10: {x + 10} - {y} = {x + 10 - y}.")
            out.append(x + 10 - y)
            borrow = 1
        else:
            t.say(f"  {ONES[i]}: {shown} - {y} = {x - y}.")
            out.append(x - y)
            borrow = 0
    result = int("".join(map(str, reversed(out))) or "0")
    assert result == a - b
    return result


def combine(t: Trace, total: int, op: str, x: int) -> int:
    """total op x for any sign of total, reduced to a column addition or subtraction of magnitudes."""
    if op == "+" and total >= 0:
        t.say(f"{total} + {x}: add the columns.")
        return column_add(t, total, x)
    if op == "-" and total < 0:
        t.say(f"{total} - {x} is -({-total} + {x}): add the magnitudes.")
        return -column_add(t, -total, x)
    a, b = (x, -total) if op == "+" else (total, x)  # a - b
    if a >= b:
        t.say(f"{total} {op} {x} is {a} - {b}.")
        return column_sub(t, a, b)
    t.say(f"{total} {op} {x} is {a} - {b}, which is negative: -({b} - {a}).")
    return -column_sub(t, b, a)


def maybe_slip(t: Trace, total: int, op: str, x: int, result: int) -> None:
    """Once per trace, at chance: a wrong value for this step, caught by checking it backwards, then the right one."""
    if not t.slip or t.rng.random() > 0.5:
        return
    t.slip = False
    wrong = result + t.rng.choice([-10, -1, 1, 10])
    back = "-" if op == "+" else "+"
    t.say(f"So {total} {op} {x} = {wrong}.")
    undone = wrong - x if op == "+" else wrong + x
    t.say(f"Let me check that step backwards: {wrong} {back} {x} = {undone}, not {total}.")
    t.say("That is wrong: I must have misread a digit. Redoing the step carefully:")
    combine(t, total, op, x)


def chain_sum_trace(t: Trace, expression: str) -> int:
    tokens = expression.split()
    terms = [int(tokens[0])] + [int(v) for v in tokens[2::2]]
    ops = tokens[1::2]
    t.say(f"I need {expression}. I will go left to right and keep a running total.")
    total = terms[0]
    t.say(f"Start with {total}.")
    for op, x in zip(ops, terms[1:], strict=True):
        result = combine(t, total, op, x)
        maybe_slip(t, total, op, x, result)
        t.say(f"So {total} {op} {x} = {result}. The running total is {result}.")
        total = result
    plus = [terms[0]] + [x for op, x in zip(ops, terms[1:], strict=True) if op == "+"]
    minus = [x for op, x in zip(ops, terms[1:], strict=True) if op == "-"]
    t.say("Check another way: add the positive terms, add the subtracted terms, then take the difference.")
    pos, neg = sum(plus), sum(minus)
    t.say(f"Positive terms: {' + '.join(map(str, plus))} = {pos}.")
    if minus:
        t.say(f"Subtracted terms: {' + '.join(map(str, minus))} = {neg}.")
        t.say(f"{pos} - {neg} = {pos - neg}.")
    verdict = "matches" if pos - neg == total else "does not match"
    t.say(f"The check gives {pos - neg}, which {verdict} the running total {total}.")
    assert pos - neg == total
    return total


def times_digit(t: Trace, a: int, d: int) -> int:
    """a x d for one digit d, digit by digit with carries."""
    carry, out = 0, []
    for i, x in enumerate(_digits(a)):
        p = x * d + carry
        extra = f" plus the carried {carry}" if carry else ""
        note = f", write {p % 10} and carry {p // 10}" if p >= 10 else ""
        t.say(f"  {ONES[i]}: {x} x {d}{extra} = {p}{note}.")
        out.append(p % 10)
        carry = p // 10
    if carry:
        t.say(f"  The last carry {carry} becomes the leading digit.")
        out.append(carry)
    result = int("".join(map(str, reversed(out))))
    assert result == a * d
    return result


def products_trace(t: Trace, expression: str) -> int:
    a, b = (int(v) for v in expression.split(" * "))
    t.say(f"I need {a} x {b}. I will multiply {a} by each digit of {b} and add the partial products.")
    partials = []
    for i, d in enumerate(_digits(b)):
        t.say(f"{a} x {d} (the {ONES[i]} digit of {b}):")
        p = times_digit(t, a, d)
        if t.slip and t.rng.random() < 0.5:
            t.slip = False
            wrong = p + t.rng.choice([1, 2]) if p < 2 else p + t.rng.choice([-2, -1, 1, 2])
            ones = (a % 10) * d
            t.say(f"So {a} x {d} = {wrong}.")
            t.say(f"Check the last digit: {a % 10} x {d} = {ones} ends in {ones % 10}, not in {wrong % 10}.")
            t.say("So I slipped somewhere. Redoing it:")
            times_digit(t, a, d)
        shifted = p * 10**i
        t.say(f"So {a} x {d} = {p}" + (f", shifted {i} place(s): {shifted}." if i else "."))
        partials.append(shifted)
    total = partials[0]
    for p in partials[1:]:
        t.say(f"Add the partial products {total} + {p}:")
        total = column_add(t, total, p)
    t.say(f"The product is {total}.")
    nines = (sum(_digits(a)) % 9, sum(_digits(b)) % 9)
    t.say(
        f"Check by casting out nines: {a} leaves {nines[0]}, {b} leaves {nines[1]}; {nines[0]} x {nines[1]} ="
        f" {nines[0] * nines[1]} leaves {nines[0] * nines[1] % 9}, and {total} leaves {sum(_digits(total)) % 9}."
    )
    assert total == a * b and (nines[0] * nines[1]) % 9 == sum(_digits(total)) % 9
    t.say("They agree.")
    return total


TRACERS = {"chain_sum": chain_sum_trace, "products": products_trace}


def rows(task: str, n: int, seed: int, error_rate: float, purpose: str = "sft") -> Iterator[dict[str, str]]:
    import reasoning_gym

    rng = random.Random(f"{task}:{seed}")
    for item in reasoning_gym.create_dataset(task, size=n, seed=seed, **TASK_ARGS[task]):
        response = traced_response(rng, error_rate, task, item["metadata"]["expression"], str(item["answer"]))
        if purpose == "rl":
            yield {"prompt": item["question"], "answer": str(item["answer"]), "solution": response, "source": task}
            continue
        yield {
            "prompt": STUDY_TEMPLATE.format(problem=item["question"]),
            "response": response,
            "answer": str(item["answer"]),
            "task": task,
        }


def traced_response(rng: random.Random, error_rate: float, task: str, expression: str, answer: str) -> str:
    """`<think>` trace `</think>` and the boxed answer, which must be reasoning-gym's `answer` (else an error)."""
    trace = Trace(rng, slip=rng.random() < error_rate)
    traced = TRACERS[task](trace, expression)
    if str(traced) != answer:
        raise AssertionError(f"{task}: traced {traced}, reasoning-gym says {answer} ({expression})")
    body = "\n".join(trace.lines)
    return f"<think>\n{body}\n</think>\n\nThe final answer is \\boxed{{{traced}}}."


# The expression inside a reasoning-gym question of each traced task (the question is all a run's problem keeps).
QUESTION_EXPRESSION = {
    "chain_sum": re.compile(r"arithmetic problem: (.+?) =\s*$"),
    "products": re.compile(r"multiplication: (.+?)\. Give"),
}


def run_rows(config: str, run_seed: int, overrides: list[str], error_rate: float) -> tuple[str, list[dict[str, str]]]:
    """(source name, rows): the training problems of `lcot-mega train CONFIG trainer.seed=run_seed`, traced."""
    from lcot_mega.config import load_config
    from lcot_mega.data import load_problems

    cfg = load_config(config, overrides)
    if len(cfg.data.train) != 1 or not cfg.data.train[0].startswith("reasoning_gym:"):
        raise SystemExit(f"--run-config needs one reasoning_gym: source in data.train, got {list(cfg.data.train)}")
    problems = load_problems(cfg.data, run_seed)[0]
    if not problems:
        raise SystemExit(f"{config}: no training problems left for seed {run_seed} (all held out as eval questions?)")
    task = problems[0].source
    if task not in TRACERS:
        raise SystemExit(f"no tracer for task {task!r} (traced: {', '.join(TRACERS)})")
    rng = random.Random(f"{task}:run{run_seed}")
    out = []
    for problem in problems:
        match = QUESTION_EXPRESSION[task].search(problem.problem)
        if match is None:
            raise SystemExit(f"{problem.uid}: no {task} expression in {problem.problem!r}")
        solution = traced_response(rng, error_rate, task, match.group(1), problem.answer)
        local_uid = problem.uid.split("/", 1)[1]  # the file source prefixes its own name again
        out.append({"uid": local_uid, "prompt": problem.problem, "answer": problem.answer, "solution": solution})
    return task, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--n", type=int, default=2000, help="examples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", default=list(TRACERS), choices=list(TRACERS))
    p.add_argument("--error-rate", type=float, default=0.25, help="share of traces with one corrected mistake")
    p.add_argument(
        "--for",
        dest="purpose",
        choices=("sft", "rl"),
        default="sft",
        help="sft: (prompt, response) rows for lcot-mega sft; rl: prompt rows with a `solution` for algo.injection",
    )
    p.add_argument("--run-config", help="rl: the training problems of this train config (see above)")
    p.add_argument("--run-seed", type=int, default=1, help="rl with --run-config: the run's trainer.seed")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of --run-config")
    args = p.parse_args(argv)
    path = Path(args.out)
    if args.run_config:
        if args.purpose != "rl":
            p.error("--run-config writes prompt rows for injection: add --for rl")
        task, out = run_rows(args.run_config, args.run_seed, args.set, args.error_rate)
        if path.stem != task:
            p.error(f"name the file {task}.jsonl (the source's name), so its problems keep the run's uids")
    else:
        out = [r for task in args.tasks for r in rows(task, args.n, args.seed, args.error_rate, args.purpose)]
        random.Random(args.seed).shuffle(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    from lcot_mega.utils.atomic_file import atomic_write

    # whole or not at all: cold_start.sh takes an existing file as done, so a kill mid-write must not leave half
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in out))
    print(f"wrote {len(out)} examples to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
