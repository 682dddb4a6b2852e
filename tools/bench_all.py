"""The performance table (docs/PERFORMANCE.md): every benchmark run once on one machine, each as a ratio to its
reference measured in the same run, with the machine described.

The benchmarks run as subprocesses (their own code, `--json` for the rows), one after the other so that they do not
share the cores:
- actor: `bench_actor.py`, Megatron train step vs a plain transformers + AdamW step (TP1, all cores);
- scaling: the same tool's `--layouts` rows (DP2, TP2, PP2 on the same cores) vs TP1;
- sync: `bench_sync.py`, weight sync per transport vs a memory copy of the same bytes;
- rollout: `bench_rollout.py`, the embedded engine vs `transformers.generate` (and `VLLMEngine` where vllm imports);
- memory: `bench_memory.py`, peak RSS and seconds of one train step on one long sequence (2k-32k tokens) with the
  long-context recipe's actor settings vs a plain transformers + AdamW step (up to 8k tokens: beyond, it would need
  well over 20 GiB here);
- data: no new run; training runs' metrics.jsonl (`--runs DIR ...`): rollouts generated per informative sample
  trained on, and the share of actor tokens spent on zero-advantage samples, grouped by dynamic-sampling mode.

    python tools/bench_all.py [--runs runs/qs3-base ...] [--quick]
        [--skip actor|scaling|sync|rollout|memory|data ...] [--out docs/PERFORMANCE.md]

Sections of --out that this tool does not write (`tools/bench_quickstart.py --write-doc`'s `## Learning per
minute`, the asynchronous-RL table from `tools/bench_async.py`) are kept as they were, after its own.

Run it on an otherwise idle machine with about 10 GB free (the SmolLM2 actor step peaks near 8 GB): the run without
memory took 6 min 40 s on 2 cores (docs/LOG.md, 2026-12-05). Memory adds several minutes more, not yet timed: its
16k- and 32k-token steps take minutes each on 2 cores; a step whose resident memory passes 20 GiB
(bench_memory.py's `--limit-gib`) is killed and reported as OOM. `--quick` uses tiny models and one repeat to
test the plumbing in about two minutes; its numbers mean nothing. The vLLM column needs the vLLM venv's Python
(docs/ROLLOUT_VLLM.md): `/work/vllm-venv/bin/python tools/bench_all.py ...` (about 4 minutes more: SmolLM2 rows
with three engines, two vLLM starts).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

TOOLS = Path(__file__).resolve().parent
REPO = TOOLS.parent
AREAS = ("actor", "scaling", "sync", "rollout", "memory", "data")


# ----------------------------------------------------------------------------- the benchmarks to run


def bench_specs(quick: bool, vllm: bool) -> dict[str, tuple[str, list[str]]]:
    """Benchmark runs by key: (script in tools/, its arguments). `actor` serves the actor and scaling tables;
    `actor_tp` adds the tiny model, whose shape splits at TP2 (SmolLM2's 3 KV heads do not)."""
    if quick:
        tiny_actor = ["--model", "tiny", "--layouts", "--steps", "1", "--sequences", "4"]
        tiny_actor += ["--prompt-len", "8", "--response-len", "8", "--no-shim-table"]
        small_rollout = ["--prompts", "2", "--n", "2", "--prompt-len", "8", "--max-new", "8", "--repeats", "1"]
        return {
            "actor": ("bench_actor.py", tiny_actor),
            "sync": ("bench_sync.py", ["--model", "tiny", "--repeats", "1"]),
            "rollout": ("bench_rollout.py", small_rollout + (["--vllm"] if vllm else [])),
            "memory": ("bench_memory.py", ["--model", "tiny", "--tokens", "256", "512"]),
        }
    long_memory = ["--model", "random135m", "--tokens", "2048", "8192", "16384", "32768", "--skip-plain-above", "8192"]
    return {
        "actor": ("bench_actor.py", ["--model", "smollm2", "--layouts"]),
        "actor_tp": ("bench_actor.py", ["--model", "tiny", "--layouts", "--no-shim-table"]),
        "sync": ("bench_sync.py", []),
        "rollout": ("bench_rollout.py", ["--vllm"] if vllm else []),
        "memory": ("bench_memory.py", long_memory),
    }


def needed_runs(areas: set[str], quick: bool) -> list[str]:
    """Benchmark keys the chosen areas read, in running order."""
    keys = []
    if areas & {"actor", "scaling"}:
        keys.append("actor")
    if "scaling" in areas and not quick:
        keys.append("actor_tp")
    keys += [k for k in ("sync", "rollout", "memory") if k in areas]
    return keys


def reproduce(spec: tuple[str, list[str]]) -> str:
    script, args = spec
    return shlex.join(["python", f"tools/{script}", *args])


def run_bench(spec: tuple[str, list[str]], tmp: Path) -> dict[str, Any]:
    """One benchmark in its own process, its output shown on stderr; its JSON rows, or {"error": ...}."""
    script, args = spec
    out = tmp / f"{script}-{len(list(tmp.iterdir()))}.json"
    print(f"[bench_all] {reproduce(spec)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(TOOLS / script), *args, "--json", str(out)], cwd=REPO, stdout=sys.stderr)
    if proc.returncode != 0 or not out.exists():
        return dict(error=f"exit code {proc.returncode}")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- the machine


def describe_machine(command: str) -> dict[str, str]:
    """What a reader needs to compare these numbers with theirs: CPU, usable cores, memory, versions, load."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    mem = _meminfo_gib()
    ram = f"{mem.get('MemTotal', math.nan):.1f} / {mem.get('MemAvailable', math.nan):.1f} GiB"
    versions = {pkg: _version(pkg) for pkg in ("torch", "megatron-core", "transformers", "vllm")}
    return {
        "CPU": cpu,
        "cores usable (sched_getaffinity) / online": f"{len(os.sched_getaffinity(0))} / {os.cpu_count()}",
        "RAM total / available at start": ram,
        "load average at start (1, 5, 15 min)": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "OS": platform.platform(),
        "Python": platform.python_version(),
        **versions,
        "git commit": _git_commit(),
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "command": command,
    }


def _meminfo_gib() -> dict[str, float]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) / 2**20 for k, v in (line.split(":", 1) for line in lines) if v.strip()}


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown"
    return (head.stdout.strip() or "unknown") + (" (uncommitted changes)" if dirty.stdout.strip() else "")


# ----------------------------------------------------------------------------- data efficiency


@dataclass
class Efficiency:
    """Sums over a run's steps (or several runs' steps: sums pool). Zero-advantage means |A| <= tol."""

    name: str
    mode: str
    steps: int = 0
    groups_generated: float = 0.0
    groups_kept: float = 0.0
    zero_groups_generated: float = 0.0
    samples_generated: float = 0.0
    informative_trained: float = 0.0
    actor_tokens: float = 0.0
    zero_actor_tokens: float = 0.0

    @property
    def rollouts_per_informative(self) -> float:
        return self.samples_generated / self.informative_trained if self.informative_trained else math.inf

    @property
    def groups_per_kept_group(self) -> float:
        return self.groups_generated / self.groups_kept if self.groups_kept else math.inf

    @property
    def zero_generated_share(self) -> float:
        return self.zero_groups_generated / self.groups_generated if self.groups_generated else math.nan

    @property
    def zero_token_share(self) -> float:
        return self.zero_actor_tokens / self.actor_tokens if self.actor_tokens else math.nan

    def add(self, other: Efficiency) -> None:
        for field in ("steps", "groups_generated", "groups_kept", "zero_groups_generated", "samples_generated"):
            setattr(self, field, getattr(self, field) + getattr(other, field))
        for field in ("informative_trained", "actor_tokens", "zero_actor_tokens"):
            setattr(self, field, getattr(self, field) + getattr(other, field))


def _num(record: dict[str, Any], key: str) -> float:
    """The metric as a float, 0 when missing or not finite (null in the file)."""
    value = record.get(key)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0


def run_config(run_dir: Path) -> tuple[str, int]:
    """(algo.dynamic_sampling.mode, rollout.n_samples) from the run's config.yaml."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    mode = cfg["algo"]["dynamic_sampling"]["mode"]
    if mode is False:  # YAML 1.1 reads an unquoted `off` as false
        mode = "off"
    return str(mode), int(cfg["rollout"]["n_samples"])


def run_efficiency(run_dir: Path) -> Efficiency:
    """Per-step sums of a run's metrics.jsonl (docs/METRICS.md keys). Steps without `rollout/groups_generated`
    (evaluation-only lines) are left out. The zero-advantage share of actor tokens is estimated per step as
    response_tokens x kept_zero / kept samples: the metrics hold counts, not per-sample lengths."""
    from lcot_mega.observe import read_metrics

    mode, n = run_config(run_dir)
    eff = Efficiency(name=str(run_dir), mode=mode)
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if "rollout/groups_generated" not in r:
            continue
        generated = _num(r, "rollout/groups_generated")
        eff.steps += 1
        eff.groups_generated += generated
        eff.samples_generated += generated * n
        per_kept = _num(r, "rollout/groups_per_kept_group")
        eff.groups_kept += generated / per_kept if per_kept else 0.0
        eff.zero_groups_generated += _num(r, "rollout/zero_adv_frac") * generated
        pos, neg = _num(r, "polarity/kept_pos_count"), _num(r, "polarity/kept_neg_count")
        zero = _num(r, "polarity/kept_zero_count")
        eff.informative_trained += pos + neg
        tokens = _num(r, "actor/response_tokens")
        if tokens and pos + neg + zero:
            eff.actor_tokens += tokens
            eff.zero_actor_tokens += tokens * zero / (pos + neg + zero)
    return eff


def efficiency_rows(run_dirs: list[Path]) -> list[Efficiency]:
    """One row per run, sorted by mode, and a pooled row per mode when a mode has several runs."""
    runs = sorted((run_efficiency(d) for d in run_dirs), key=lambda e: (e.mode, e.name))
    rows: list[Efficiency] = []
    for mode in dict.fromkeys(e.mode for e in runs):
        of_mode = [e for e in runs if e.mode == mode]
        rows += of_mode
        if len(of_mode) > 1:
            pooled = Efficiency(name=f"all {len(of_mode)} `{mode}` runs, pooled", mode=mode)
            for e in of_mode:
                pooled.add(e)
            rows.append(pooled)
    return rows


# ----------------------------------------------------------------------------- markdown


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1%}"


def _ratio(x: float) -> str:
    """Two decimals; two significant digits below 0.1 (a sync at 0.004x memcpy is not 0.00)."""
    if math.isnan(x) or math.isinf(x):
        return "-" if math.isnan(x) else "inf"
    return f"{x:.2f}" if abs(x) >= 0.1 or x == 0 else f"{x:.2g}"


def render_header(machine: dict[str, str]) -> str:
    lines = ["# Performance", ""]
    lines += ["Written by `tools/bench_all.py`; every ratio is ours / its reference (the memory table's: its reference"]
    lines += ["/ ours), both measured in the same run on this machine. Ratios from a loaded machine are not comparable"]
    lines += ["to an idle one's.", ""]
    lines += [md_table(["machine", "value"], [[k, f"`{v}`" if k == "command" else v] for k, v in machine.items()])]
    return "\n".join(lines)


def sections(doc: str) -> dict[str, str]:
    """Section title -> its whole text (`## title` to the next section, trailing newlines cut), in file order."""
    return {chunk.split("\n", 1)[0].strip(): "## " + chunk.rstrip("\n") for chunk in doc.split("\n## ")[1:]}


def kept_sections(old: str) -> dict[str, str]:
    """Section title -> its whole text from an earlier PERFORMANCE.md, for the measured sections only (`--keep`)."""
    return {
        title: text
        for title, text in sections(old).items()
        if "Not measured in this run" not in text and "failed (" not in text
    }


def keep_foreign(doc: str, old: str) -> str:
    """Append the sections of the earlier file that this tool does not write (another tool's, such as
    bench_quickstart.py's `## Learning per minute`), as they were and in their order: a rewrite never drops them."""
    ours = sections(doc)
    foreign = [text for title, text in sections(old).items() if title not in ours]
    return doc.rstrip("\n") + "\n\n" + "\n\n".join(foreign) + "\n" if foreign else doc


def keep_skipped(doc: str, old: dict[str, str], when: str) -> str:
    """Replace each section this run skipped by the earlier run's measured one, labelled with that run's date."""
    out = []
    for i, chunk in enumerate(doc.split("\n## ")):
        title = chunk.split("\n", 1)[0].strip()
        if i and "Not measured in this run (`--skip" in chunk and title in old:
            kept = old[title][3:]
            head, _, rest = kept.partition("\n")
            trail = chunk[len(chunk.rstrip("\n")) :]  # the blank line before the next section, or the final newline
            note = f"_Kept from the earlier run of this file ({when}; `--keep`), not measured now._"
            if not rest.lstrip("\n").startswith("_Kept from"):  # kept before: its note names the run it came from
                rest = f"\n{note}\n{rest}"
            chunk = f"{head}\n{rest}{trail}"
        out.append(chunk)
    return "\n## ".join(out)


def _old_date(old: str) -> str:
    for line in old.splitlines():
        if line.startswith("| date (UTC) |"):
            return line.split("|")[2].strip()
    return "date unknown"


def render_section(title: str, what: str, body: str | None, how: str, status: str | None = None) -> str:
    """A table's section: what the ratio means, the table (or why there is none), how to reproduce it."""
    text = body if body is not None else status or "Not measured in this run."
    return f"## {title}\n\n{what}\n\n{text}\n\nHow to reproduce: `{how}`"


def render_actor(res: dict[str, Any]) -> str:
    meta, tp1 = res["meta"], res["layouts"][0]
    rows = [
        [
            meta["model"],
            f"{tp1['procs']} x {tp1['threads']}",
            f"{meta['tokens_per_step']:,}",
            f"{tp1['megatron_tok_s']:,.0f} ({tp1['megatron_step_s']:.2f} s)",
            f"{tp1['hf_tok_s']:,.0f} ({tp1['hf_step_s']:.2f} s)",
            _ratio(tp1["ratio"]),
            f"{max(tp1['megatron_rss_mib']):,.0f} / {tp1['hf_rss_mib']:,.0f}",
        ]
    ]
    headers = ["model", "procs x threads", "tokens/step", "Megatron tok/s (step)", "plain PyTorch tok/s (step)"]
    text = md_table([*headers, "ratio", "peak RSS MiB ours / plain"], rows)
    if res.get("shim"):
        shim = res["shim"]
        text += f"\n\nThe plain step under the CPU shim's TorchFunctionMode: {_ratio(shim['ratio'])} of plain speed"
        text += f" ({shim['calls']:,} intercepted calls per step)."
    return text


def render_scaling(results: list[dict[str, Any]]) -> str:
    rows = []
    for res in results:
        base = res["layouts"][0]["megatron_tok_s"]
        for lay in res["layouts"]:
            rss = " + ".join(f"{x:,.0f}" for x in lay["megatron_rss_mib"])
            where = [res["meta"]["model"], lay["layout"], f"{lay['procs']} x {lay['threads']}"]
            rate = [f"{lay['megatron_tok_s']:,.0f}", _ratio(lay["megatron_tok_s"] / base), _ratio(lay["ratio"])]
            rows.append([*where, str(lay["micro_batches"]), *rate, rss])
    headers = ["model", "layout", "procs x threads", "micro-batches/rank", "tok/s", "vs TP1 (same cores)"]
    return md_table([*headers, "vs plain PyTorch", "peak RSS MiB per proc"], rows)


def render_sync(res: dict[str, Any]) -> str:
    meta = res["meta"]
    head = f"Model {meta['model']} ({meta['params'] / 1e6:.1f}M parameters, {meta['bytes'] / 1e9:.3f} GB per sync),"
    head += f" bucket {meta['bucket_mb']:g} MiB, actor TP=2 on {meta['procs']} x {meta['threads']} threads;"
    head += f" median of {meta['repeats']} syncs after a warm-up."
    base = [r for r in res["rows"] if "name" in r]
    rows = [
        [r["name"], f"{r['seconds']:.4f}", f"{r['gb_per_s']:.3f}", str(r["buckets"] or "-"), _ratio(r["ratio"])]
        for r in base
    ]
    out = head + "\n\n" + md_table(["transport", "seconds", "GB/s", "buckets", "ratio (GB/s vs memcpy)"], rows)
    profiled = [r for r in base if r.get("breakdown_s")]
    if profiled:
        parts = list(dict.fromkeys(p for r in profiled for p in r["breakdown_s"]))
        cells = [[r["name"], *(f"{r['breakdown_s'].get(p, 0.0):.3f}" for p in parts)] for r in profiled]
        head = ["transport", *parts]
        if all("verify_s" in r for r in profiled):  # after the sync's seconds, not part of them
            head.append("then the probe check (`rollout.verify_sync`)")
            for row, r in zip(cells, profiled, strict=True):
                row.append(f"{r['verify_s']:.3f}")
        where = "Where a sync's seconds go on rank 0 (median per part; `bench_sync.SyncProfile`):"
        out += "\n\n" + where + "\n\n" + md_table(head, cells)
    return out + _render_delta([r for r in res["rows"] if "sent_frac" in r])


def _render_delta(rows: list[dict[str, Any]]) -> str:
    """bench_sync's bf16 rows: full syncs, then `rollout.sync: delta` after simulated steps."""
    if not rows:
        return ""
    cells = [
        [r["transport"], f"{r['seconds']:.3f}", f"{r['sent_frac']:.3f}", f"{r['changed_frac']:.4f}",
         f"{r['effective_gb_per_s']:.3f}", _ratio(r["ratio"]), str(r["fallbacks"])]
        for r in rows
    ]  # fmt: skip
    head = ["row", "seconds", "sent / full", "elements changed", "effective GB/s", "ratio vs memcpy", "fallbacks"]
    what = "A bf16 server, full syncs and then delta syncs (`rollout.sync: delta`) after simulated steps (every"
    what += " weight moved by +-lr); effective GB/s = the full sync's bytes / seconds:"
    return "\n\n" + what + "\n\n" + md_table(head, cells)


def render_rollout(res: dict[str, Any]) -> str:
    meta = res["meta"]
    head = f"{meta['prompts']} prompts x n={meta['n']}, prompts of {meta['prompt_len'] // 2}-{meta['prompt_len']}"
    head += (
        f" tokens, {meta['max_new']} new tokens (EOS ignored), {meta['threads']} threads; best of {meta['repeats']}."
    )
    with_vllm = any(r.get("vllm_tok_s") for r in res["rows"])
    rows = []
    for r in res["rows"]:
        row = [r["model"], r["dtype"], f"{r['ours_tok_s']:,.0f}", f"{r['hf_tok_s']:,.0f}", _ratio(r["ratio"])]
        if with_vllm:
            v = r.get("vllm_tok_s")
            row += [f"{v:,.0f}", _ratio(r["ours_tok_s"] / v)] if v else ["-", "-"]
        rows.append(row)
    headers = ["model", "dtype", "embedded tok/s", "transformers.generate tok/s", "ratio"]
    headers += ["vLLM tok/s", "ratio vs vLLM"] if with_vllm else []
    return head + "\n\n" + md_table(headers, rows)


def _repo_path(path: str) -> str:
    """A path inside the repository relative to it: the document names no checkout's location."""
    return str(Path(path).relative_to(REPO)) if Path(path).is_relative_to(REPO) else path


def _step_ran(peak: float | None, oom: bool) -> bool:
    return peak is not None and not oom


def _step_cells(peak: float | None, seconds: float | None, oom: bool) -> list[str]:
    """One side of a memory row: peak RSS MiB and step seconds; OOM with the RSS it was killed at, or error."""
    if oom:
        return [f"OOM (killed at {peak:,.0f})", "-"]
    if not _step_ran(peak, oom) or seconds is None:
        return ["error", "-"]
    return [f"{peak:,.0f}", f"{seconds:.2f}"]


def render_memory(res: dict[str, Any]) -> str:
    meta = res["meta"]
    settings = ", ".join(f"`actor.{k}: {v}`" for k, v in meta["settings"].items()) or "unknown (no step of ours ran)"
    head = f"Model {meta['model']}, one sequence of N tokens ({meta['prompt_tokens']} prompt, the rest response),"
    head += f" {meta['threads']} threads per process; actor settings from `{_repo_path(meta['recipe'])}`: {settings}."
    head += f" OOM = resident memory passed {meta['limit_gib']:g} GiB and the step was killed."
    rows = []
    for r in res["rows"]:
        ours = _step_cells(r["peak_rss_mib"], r["step_s"], r["oom"])
        plain = _step_cells(r["plain_peak_rss_mib"], r["plain_step_s"], r["plain_oom"])
        plain = ["not run", "-"] if r["plain_skipped"] else plain
        both = _step_ran(r["peak_rss_mib"], r["oom"]) and _step_ran(r["plain_peak_rss_mib"], r["plain_oom"])
        ratio = _ratio(r["plain_peak_rss_mib"] / r["peak_rss_mib"]) if both else "-"
        rows.append([f"{r['tokens']:,}", *ours, *plain, ratio])
    headers = ["tokens", "our peak RSS MiB", "our step s", "plain transformers peak RSS MiB", "plain step s"]
    return head + "\n\n" + md_table([*headers, "ratio (plain / our peak RSS)"], rows)


MEMORY_WHAT = (
    "One actor train step (clipped policy loss, backward, Adam) on one sequence of N tokens, each side in a fresh"
    " process whose peak resident memory (VmHWM) is read from outside: our Megatron-core actor with the"
    " long-context recipe's settings vs transformers (its default SDPA attention) + torch.optim.AdamW on the full"
    " logits. Per side: peak RSS MiB and step seconds; OOM when killed at the limit, not run above"
    " `--skip-plain-above` (at 16k and 32k tokens the plain step would need well over 20 GiB). Ratio = plain peak"
    " RSS / our peak RSS where both ran: how many times less memory our step holds (higher is better, unlike the"
    " other ratios)."
)


def render_data(rows: list[Efficiency]) -> str:
    out = []
    for e in rows:
        counts = [str(e.steps), f"{e.samples_generated:,.0f}", f"{e.informative_trained:,.0f}"]
        ratios = [_ratio(e.rollouts_per_informative), _ratio(e.groups_per_kept_group), _pct(e.zero_generated_share)]
        out.append([e.mode, e.name, *counts, *ratios, f"{e.actor_tokens:,.0f}", _pct(e.zero_token_share)])
    headers = ["dynamic sampling", "run", "steps", "samples generated", "informative samples trained"]
    headers += ["rollouts per informative sample", "groups generated per kept group"]
    headers += ["zero-adv groups among generated", "actor response tokens", "zero-adv share of actor tokens"]
    return md_table(headers, out)


DATA_WHAT = (
    "From training runs' metrics.jsonl, not from a new run. Rollouts per informative sample = samples generated"
    " (`rollout/groups_generated` x `rollout.n_samples`, every dynamic-sampling round) / kept samples with nonzero"
    " advantage (`polarity/kept_pos_count` + `polarity/kept_neg_count`); lower is better, 1.0 is no waste."
    " Zero-adv groups among generated (`rollout/zero_adv_frac`) is the share a run without dynamic sampling would"
    " train on for nothing. Zero-adv share of actor tokens: `actor/response_tokens` x `polarity/kept_zero_count`"
    " / kept samples per step (an estimate: the metrics hold counts, not per-sample lengths)."
)


ACTOR_WHAT = (
    "Megatron-core actor (TP1, all cores) vs a transformers + torch.optim.AdamW step on the same batch: the"
    " same policy loss, gradient clipping and Adam update, fp32. Ratio = our tokens/s / plain tokens/s."
)
SCALING_WHAT = (
    "The same step split over gloo processes on the same cores (threads divided among ranks). vs TP1 ="
    " tokens/s / the TP1 row of the same model; 1.00 means splitting costs nothing."
)
SYNC_WHAT = (
    "A TP=2 actor's weights into a rollout engine per transport vs `copy_` of the same bytes on one rank."
    " Ratio = sync GB/s / memcpy GB/s (1.0 would be a sync as fast as a local copy)."
)
ROLLOUT_WHAT = (
    "Our embedded engine vs `transformers.generate` (and vLLM where it imports), same sampling settings"
    " and KV cache. Ratio = our tokens/s / theirs."
)


def render(
    machine: dict[str, str], areas: set[str], specs: dict, results: dict, data: list[Efficiency] | None, runs: list[str]
) -> str:
    """The whole document; an area that was skipped or failed keeps its section with the reason."""

    def status(area: str, *keys: str) -> str | None:
        if area not in areas:
            return f"Not measured in this run (`--skip {area}`)."
        failed = [f"`{reproduce(specs[k])}` failed ({results[k]['error']})" for k in keys if "error" in results[k]]
        return "; ".join(failed) + "; see its output." if failed else None

    def measured(title: str, what: str, area: str, keys: list[str], body: Callable[[], str]) -> str:
        """The section of an area measured by benchmark runs `keys`; `body` renders their results."""
        st = status(area, *keys)
        how = " && ".join(reproduce(specs[k]) for k in keys)
        return render_section(title, what, body() if st is None else None, how, st)

    scaling = [k for k in ("actor", "actor_tp") if k in specs]
    st = "Not measured in this run (no `--runs` given)." if data is None and "data" in areas else None
    st = "Not measured in this run (`--skip data`)." if "data" not in areas else st
    skip_runs = " ".join(f"--skip {area}" for area in AREAS if area != "data")
    sections = [
        render_header(machine),
        measured(
            "Actor train step vs plain PyTorch", ACTOR_WHAT, "actor", ["actor"], lambda: render_actor(results["actor"])
        ),
        measured(
            "TP/PP scaling on CPU",
            SCALING_WHAT,
            "scaling",
            scaling,
            lambda: render_scaling([results[k] for k in scaling]),
        ),
        measured("Weight sync vs memory copy", SYNC_WHAT, "sync", ["sync"], lambda: render_sync(results["sync"])),
        measured(
            "Rollout vs transformers.generate",
            ROLLOUT_WHAT,
            "rollout",
            ["rollout"],
            lambda: render_rollout(results["rollout"]),
        ),
        measured(
            "Long sequences: one train step's memory",
            MEMORY_WHAT,
            "memory",
            ["memory"],
            lambda: render_memory(results["memory"]),
        ),
        render_section(
            "Data efficiency: dynamic sampling",
            DATA_WHAT,
            render_data(data) if data else None,
            f"python tools/bench_all.py {skip_runs} --runs " + (" ".join(runs) or "RUN_DIR ..."),
            st,
        ),
    ]
    return "\n\n".join(sections) + "\n"


# ----------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", type=Path, default=[], help="training run directories for the data table")
    ap.add_argument("--quick", action="store_true", help="tiny models, one repeat: tests the tool, not the code")
    ap.add_argument("--skip", action="append", choices=AREAS, default=[], help="leave an area out (repeatable)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "PERFORMANCE.md")
    ap.add_argument("--keep", action="store_true", help="skipped areas keep their measured sections from --out")
    args = ap.parse_args()
    old = args.out.read_text() if args.out.is_file() else ""
    areas = set(AREAS) - set(args.skip)
    command = shlex.join(["python", "tools/bench_all.py", *sys.argv[1:]])
    machine = describe_machine(command)  # before the benchmarks: the load average is the one they started under
    specs = bench_specs(args.quick, vllm=importlib.util.find_spec("vllm") is not None)
    data = efficiency_rows(args.runs) if "data" in areas and args.runs else None
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in needed_runs(areas, args.quick):
            results[key] = run_bench(specs[key], Path(tmp))
    doc = render(machine, areas, specs, results, data, [str(r) for r in args.runs])
    if args.keep and old:
        doc = keep_skipped(doc, kept_sections(old), _old_date(old))
    args.out.write_text(keep_foreign(doc, old))
    print(f"[bench_all] wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
