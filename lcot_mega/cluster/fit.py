"""Does the requested layout fit the cluster? Answered from the config and the nodes' sizes, before Ray is asked.

Ray answers a placement group that cannot be placed by waiting (`ray_runtime.PLACEMENT_TIMEOUT_S`), then with a
resource dict; this check names the config key to change at once. It mirrors what `ray_runtime` requests:
disaggregated mode first reserves one PACK placement group of `num_engines` bundles {CPU: cpus_per_engine, GPU:
gpus_per_engine} (`ray_engines.ServedEngineGroup`), then one of `actor_ranks` bundles {CPU: cpus_per_rank, GPU:
gpus_per_rank} (`ray_group.RayRanks`); colocated mode reserves only the actor ranks' group (its engine lives
in rank 0's process, on rank 0's devices). A bundle never spans nodes; zero GPU entries are dropped.

Packing is first-fit decreasing per placement group, in creation order, on the nodes' total resources (not what
other jobs hold now). Ray's PACK heuristic is not exactly FFD, so a layout FFD barely fails might still be placed
(and vice versa in rare cases); the per-bundle and total checks are exact.

Command line (for launch scripts; exit 0 fits, 1 does not, 2 bad arguments or config):
    python -m lcot_mega.cluster.fit CONFIG [overrides] --nodes 2 --gpus-per-node 8 --cpus-per-node 64
    python -m lcot_mega.cluster.fit CONFIG [overrides] --ray-address auto
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lcot_mega.config import Config, ConfigError, load_config

EPS = 1e-9
"""Ray resources are fractional (multiples of 1e-4); compare with a little slack."""


@dataclass(frozen=True)
class NodeResources:
    """One node's total logical resources, as Ray counts them."""

    name: str
    cpus: float
    gpus: float


@dataclass(frozen=True)
class Bundle:
    """One placement-group bundle: what one actor rank or one served engine reserves on a single node."""

    what: str
    """'actor rank 3', 'engine 1'."""
    cpus: float
    gpus: float
    keys: str
    """The config keys that size it, named when it does not fit."""


@dataclass
class FitReport:
    """Every reason the layout does not fit (empty when it fits), and a one-line summary."""

    summary: str
    layout: list[str] = field(default_factory=list)
    """What no cluster could fix: TP x PP must divide the ranks (the ranks' own build refuses it too)."""
    placement: list[str] = field(default_factory=list)
    """What these nodes cannot hold: a TP group wider than a node, totals, bundle sizes, packing."""

    @property
    def problems(self) -> list[str]:
        return self.layout + self.placement

    @property
    def fits(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        return "\n".join([self.summary, *(f"  - {p}" for p in self.problems)])


def nodes_from_ray(ray_nodes: Sequence[dict[str, Any]] | None = None) -> list[NodeResources]:
    """The alive nodes of `ray.nodes()` (or of the given records, for tests) with their CPU and GPU totals."""
    if ray_nodes is None:
        import ray

        ray_nodes = ray.nodes()
    out = []
    for n in ray_nodes:
        if not n.get("Alive", False):
            continue
        res = n.get("Resources", {})
        name = f"{n.get('NodeManagerAddress', '?')} ({str(n.get('NodeID', ''))[:8]})"
        out.append(NodeResources(name, float(res.get("CPU", 0.0)), float(res.get("GPU", 0.0))))
    return out


def uniform_nodes(count: int, cpus: float, gpus: float) -> list[NodeResources]:
    """`count` identical nodes (a dry run for a cluster that is not up yet)."""
    return [NodeResources(f"node{i}", float(cpus), float(gpus)) for i in range(count)]


def placement_groups(cfg: Config) -> list[list[Bundle]]:
    """The placement groups `ray_runtime` creates for `cfg`, in creation order."""
    c = cfg.cluster
    keys = "cluster.cpus_per_rank / gpus_per_rank"
    ranks = [Bundle(f"actor rank {i}", c.cpus_per_rank, c.gpus_per_rank, keys) for i in range(c.actor_ranks)]
    if c.mode != "disaggregated":
        return [ranks]
    keys = "cluster.cpus_per_engine / gpus_per_engine"
    engines = [Bundle(f"engine {i}", c.cpus_per_engine, c.gpus_per_engine, keys) for i in range(c.num_engines)]
    return [engines, ranks]  # the servers are started first: they load while the ranks build


def first_unpacked(groups: Sequence[Sequence[Bundle]], nodes: Sequence[NodeResources]) -> str | None:
    """First-fit decreasing of each group's bundles into what the nodes have left; None if all fit, else a
    sentence naming the first bundle that does not fit and what each node had left."""
    free = [[n.cpus, n.gpus] for n in nodes]
    for group in groups:
        for b in sorted(group, key=lambda b: (b.gpus, b.cpus), reverse=True):  # stable: lowest index first
            slot = next((f for f in free if f[0] + EPS >= b.cpus and f[1] + EPS >= b.gpus), None)
            if slot is None:
                left = ", ".join(f"{n.name} {f[1]:g} GPU {f[0]:g} CPU" for n, f in zip(nodes, free, strict=True))
                return (
                    f"{b.what} ({b.gpus:g} GPU, {b.cpus:g} CPU) cannot be placed: the bundles before it leave"
                    f" [{left}] and a bundle cannot span nodes. Use smaller bundles ({b.keys}), fewer of them,"
                    " or larger nodes"
                )
            slot[0] -= b.cpus
            slot[1] -= b.gpus
    return None


def layout_errors(cfg: Config) -> list[str]:
    """Layouts no cluster could hold: ranks that do not divide into model-parallel groups, several engines in
    colocated mode (its one engine lives in actor rank 0's process). Also run by `trainer.preflight`."""
    c, a = cfg.cluster, cfg.actor
    errors = []
    model_parallel = a.tensor_parallel * a.pipeline_parallel * a.context_parallel
    if c.actor_ranks % model_parallel:
        errors.append(
            f"cluster.actor_ranks = {c.actor_ranks} is not divisible by actor.tensor_parallel x"
            f" actor.pipeline_parallel x actor.context_parallel = {a.tensor_parallel} x {a.pipeline_parallel} x"
            f" {a.context_parallel}: set cluster.actor_ranks to a multiple of {model_parallel}, or change"
            " actor.tensor_parallel / actor.pipeline_parallel / actor.context_parallel"
        )
    if c.mode == "colocated" and c.num_engines != 1:
        errors.append(
            f"cluster.num_engines = {c.num_engines}: colocated mode runs one engine, inside actor rank 0;"
            " set cluster.num_engines=1, or cluster.mode=disaggregated for several engines"
        )
    return errors


def _tensor_parallel_problems(cfg: Config, nodes: Sequence[NodeResources]) -> list[str]:
    c, a = cfg.cluster, cfg.actor
    problems = []
    tp_gpus = a.tensor_parallel * c.gpus_per_rank
    biggest = max((n.gpus for n in nodes), default=0.0)
    if c.gpus_per_rank > 0 and a.tensor_parallel > 1 and tp_gpus > biggest + EPS:
        problems.append(
            f"actor.tensor_parallel = {a.tensor_parallel} needs {tp_gpus:g} GPUs (x cluster.gpus_per_rank ="
            f" {c.gpus_per_rank:g}) in one node, the largest has {biggest:g}: tensor-parallel collectives run every"
            f" layer and must stay on NVLink. Lower actor.tensor_parallel (use actor.pipeline_parallel across nodes)"
        )
    return problems


def _demand(cfg: Config, resource: str) -> tuple[float, str]:
    """Total `resource` ('cpus' or 'gpus') the placement groups reserve, and how it is made up."""
    c = cfg.cluster
    per_rank, per_engine = getattr(c, f"{resource}_per_rank"), getattr(c, f"{resource}_per_engine")
    total = c.actor_ranks * per_rank
    how = f"cluster.actor_ranks {c.actor_ranks} x cluster.{resource}_per_rank {per_rank:g}"
    if c.mode == "disaggregated":
        total += c.num_engines * per_engine
        how += f" + cluster.num_engines {c.num_engines} x cluster.{resource}_per_engine {per_engine:g}"
    return total, how


def _resource_problems(cfg: Config, nodes: Sequence[NodeResources]) -> list[str]:
    c = cfg.cluster
    problems = []
    for resource, unit in (("gpus", "GPU"), ("cpus", "CPU")):
        need, how = _demand(cfg, resource)
        have = sum(getattr(n, resource) for n in nodes)
        if need > have + EPS:
            problems.append(
                f"the layout asks for {need:g} {unit}s ({how}), the cluster has {have:g} on {len(nodes)} node(s):"
                f" lower those keys or add nodes"
            )
        largest = max((getattr(n, resource) for n in nodes), default=0.0)
        sizes = [("rank", "actor rank", getattr(c, f"{resource}_per_rank"))]
        if c.mode == "disaggregated":
            sizes.append(("engine", "engine", getattr(c, f"{resource}_per_engine")))
        for key, what, size in sizes:
            if size > largest + EPS:
                problems.append(
                    f"cluster.{resource}_per_{key} = {size:g}: one {what} needs that many {unit}s on one node,"
                    f" the largest node has {largest:g}. Lower cluster.{resource}_per_{key} or use larger nodes"
                )
    return problems


def _nodes_text(nodes: Sequence[NodeResources], unit: str) -> str:
    sizes = [n.gpus if unit == "GPU" else n.cpus for n in nodes]
    if not sizes:
        return "no nodes"
    if len(set(sizes)) == 1:
        return f"{len(nodes)} node{'s' * (len(nodes) != 1)} x {sizes[0]:g} {unit}{'s' * (sizes[0] != 1)}"
    return f"{len(nodes)} nodes ({'+'.join(f'{s:g}' for s in sizes)} {unit}s)"


def _summary(cfg: Config, nodes: Sequence[NodeResources], fits: bool) -> str:
    c, a = cfg.cluster, cfg.actor
    unit = "GPU" if c.gpus_per_rank > 0 or (c.mode == "disaggregated" and c.gpus_per_engine > 0) else "CPU"
    mp = a.tensor_parallel * a.pipeline_parallel * a.context_parallel
    dp = f"{c.actor_ranks // mp}" if c.actor_ranks % mp == 0 else "?"
    layout = f"{c.actor_ranks} actor rank{'s' * (c.actor_ranks != 1)} (TP {a.tensor_parallel} x PP"
    layout += f" {a.pipeline_parallel}{f' x CP {a.context_parallel}' if a.context_parallel > 1 else ''} x DP {dp})"
    if c.mode == "disaggregated":
        per = c.gpus_per_engine if unit == "GPU" else c.cpus_per_engine
        layout += f" + {c.num_engines} engine{'s' * (c.num_engines != 1)} x {per:g} {unit}"
    else:
        layout += " + 1 engine inside rank 0"
    need, _ = _demand(cfg, "gpus" if unit == "GPU" else "cpus")
    have = sum(n.gpus if unit == "GPU" else n.cpus for n in nodes)
    verdict = f"fits, {have - need:g} {unit}s spare" if fits else "does not fit"
    return f"{layout} on {_nodes_text(nodes, unit)}: {verdict}"


def check_fit(cfg: Config, nodes: Sequence[NodeResources]) -> FitReport:
    """Every reason `cfg`'s Ray layout cannot be placed on `nodes` (see the module docstring), each naming the key
    to change, and a one-line summary."""
    if cfg.cluster.mode not in ("colocated", "disaggregated"):
        mode = cfg.cluster.mode
        problem = f"cluster.mode = {mode!r} uses no cluster: set cluster.mode=colocated or disaggregated"
        return FitReport(f"cluster.mode = {mode!r}: one process, no Ray", layout=[problem])
    layout = layout_errors(cfg)
    resources = _resource_problems(cfg, nodes)
    placement = _tensor_parallel_problems(cfg, nodes) + resources
    if not resources:  # packing is only worth a word when the sizes alone do not already rule it out
        unpacked = first_unpacked(placement_groups(cfg), nodes)
        placement += [unpacked] if unpacked else []
    return FitReport(_summary(cfg, nodes, not (layout or placement)), layout, placement)


def _live_nodes(address: str) -> list[NodeResources]:
    """The alive nodes of the Ray cluster at `address`, joined only for the question."""
    from lcot_mega.cluster.ray_runtime import check_reachable, import_ray

    ray = import_ray()
    check_reachable(address)
    ray.init(address=address, logging_level=logging.WARNING)
    try:
        return nodes_from_ray()
    finally:
        ray.shutdown()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lcot-mega fit",
        description="Check that a config's actor ranks and rollout engines fit a Ray cluster (exit 0 fits, 1 not).",
    )
    p.add_argument("config", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. cluster.actor_ranks=8")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--ray-address", help="read the nodes of this running Ray cluster ('auto', host:port)")
    where.add_argument("--nodes", type=int, help="dry run: this many identical nodes")
    p.add_argument("--gpus-per-node", type=float, default=0.0, help="with --nodes")
    p.add_argument("--cpus-per-node", type=float, default=None, help="with --nodes (required)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command line of the module docstring."""
    p = build_parser()
    args = p.parse_intermixed_args(argv)
    if args.nodes is not None and (args.nodes < 1 or args.cpus_per_node is None):
        p.error("--nodes needs a count >= 1 and --cpus-per-node")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"lcot-mega fit: {e}", file=sys.stderr)
        return 2
    if args.ray_address:
        try:
            nodes = _live_nodes(args.ray_address)
        except Exception as e:  # RayStartError (unreachable) or Ray's own refusal: say so, exit 2
            print(f"lcot-mega fit: cannot read the Ray cluster at {args.ray_address!r}: {e}", file=sys.stderr)
            return 2
    else:
        nodes = uniform_nodes(args.nodes, args.cpus_per_node, args.gpus_per_node)
    report = check_fit(cfg, nodes)
    print(report)
    return 0 if report.fits else 1


if __name__ == "__main__":
    sys.exit(main())
