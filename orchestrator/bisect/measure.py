"""The Ray side of `bench bisect`: one slot whose hardware is the pair's, each commit's tree shipped as
the task's `working_dir`, every run written as a normal row.

Why not the suite's actor: an old commit's tree may lack the orchestrator's current modules, and Ray
pickles functions by module reference. The task is `remote.run_point` (standard library only,
pickled by value), run with `runtime_env={"working_dir": <the commit's zip>}` so the commit's own
`bench run` runs. Task-level runtime envs take URIs only, so the zip (`git archive`, content-hashed)
is uploaded to the cluster's GCS here, the way `ray.init(runtime_env=...)` does it for a job.

The slot is chosen like the scheduler's: a GPU when the pair ran on one, the NVMe device the rows
name (a `nvme:<dev>` resource when the node advertises it), pinned to a node (NodeAffinity, hard)
whose hardware key, read on that slot by `remote.node_report`, is the pair's. Runs go one at a time.
Rows: suite `<the pair's suite>.bisect`, a fresh suite run id, `git_commit` = the commit tested,
spec hash and run id unique per commit and repeat, config key and hardware key the pair's.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from orchestrator.bisect import commits as git
from orchestrator.bisect import remote
from orchestrator.bisect.pair import Choice, Pair
from orchestrator.bisect.search import Outcome, Run, Settings, search
from orchestrator.cluster.actor import RunOutcome
from orchestrator.cluster.connect import ray_session
from orchestrator.cluster.hosts import list_nodes, slots_of
from orchestrator.cluster.submit import new_suite_run_id
from orchestrator.regress.check import BISECT_SUFFIX
from orchestrator.results.schema import build_row
from orchestrator.results.store import check_writable, write_row
from orchestrator.suite.load import NOT_IN_CONFIG_KEY
from orchestrator.suite.spec import ModelSpec, RunSpec, stable_hash
from worker import envs
from worker.config import RunConfig, flat_owners
from worker.errors import UserError

log = logging.getLogger(__name__)

RUN_TIMEOUT_S = 3600.0  # a suite's default timeout_s
SETUP_S = 600.0  # on top: the runtime env (unpacking the tree) and a worker process
REPORT_TIMEOUT_S = 120.0
EXIT_FOUND, EXIT_UNDECIDED, EXIT_NOT_REPRODUCED = 0, 1, 3


@dataclass(frozen=True)
class Target:
    """The slot every run of the bisection uses."""

    node_id: str
    host: str
    gpu: bool
    nvme: str | None
    nvme_resource: bool
    fingerprint: dict[str, Any]
    cache_dir: str


@dataclass
class BisectReport:
    choice: Choice
    commits: list[str]
    subjects: dict[str, str]
    outcome: Outcome
    suite: str
    suite_run_id: str
    where: str
    host: str
    rows: int

    @property
    def exit_code(self) -> int:
        return {"found": EXIT_FOUND, "not-reproduced": EXIT_NOT_REPRODUCED}.get(self.outcome.status, EXIT_UNDECIDED)


def bisect(uri: str, choice: Choice, *, repo: str, settings: Settings = Settings(), address: str | None = None,
           timeout_s: float = RUN_TIMEOUT_S) -> BisectReport:
    """Bisect `choice` over the commits of `repo` on the cluster (default: the embedded local Ray)."""
    root = git.repo_root(repo)
    good, bad = git.resolve(root, choice.good, "--good"), git.resolve(root, choice.bad, "--bad")
    commits = git.between(root, good, bad)
    flags, flat = run_flags(choice.pair)
    check_writable(uri)
    suite = choice.pair.suite + BISECT_SUFFIX
    suite_run_id = new_suite_run_id(suite)
    log.info("bisecting %d commits (%s..%s) for %s; rows go to suite run %s", len(commits), good[:12], bad[:12],
             choice.metric.name, suite_run_id)
    with tempfile.TemporaryDirectory(prefix="bench-bisect-") as tmp, ray_session(address) as where:
        target = find_target(choice.pair)
        runner = Runner(choice, target, root, Path(tmp), uri, suite, suite_run_id, flags, flat, timeout_s)
        outcome = search(commits, runner.measure, choice.metric.sign, settings)
    return BisectReport(choice, commits, git.subjects(root, commits), outcome, suite, suite_run_id, where, target.host,
                        runner.rows)


def run_flags(pair: Pair) -> tuple[list[str], dict[str, Any]]:
    """(the `bench run` flags of the pair's config, its flat config for the rows).

    Only values that differ from the current RunConfig default become flags, so an old commit that
    lacks a newer flag still runs when the pair does not use it; host-local paths and log switches
    (the keys left out of the config key) are not passed at all."""
    nested = pair.nested_config
    given = {}
    for k, v in nested.items():
        given.update(v if isinstance(v, dict) else {k: v})
    owners, defaults = flat_owners(), RunConfig().to_flat()
    unknown = sorted(set(given) - set(owners))
    if unknown:
        log.warning("the pair's config has keys this version does not know, not passed: %s", ", ".join(unknown))
    known = {k: v for k, v in given.items() if k in owners and k not in NOT_IN_CONFIG_KEY}
    flat = RunConfig.from_flat(known, where=f"the config of pair {pair.describe()}").to_flat()
    flags: list[str] = []
    for k, v in known.items():
        if v == defaults[k]:
            continue
        if v is None:
            log.warning("%s: the pair ran with no value where the default is %r; that cannot be a flag, the "
                        "default applies", k, defaults[k])
            continue
        flag = "--" + k.replace("_", "-")
        flags += ([flag] if v else [f"--no-{flag[2:]}"]) if isinstance(v, bool) else [flag, str(v)]
    return flags, flat


def find_target(pair: Pair) -> Target:
    """A slot of the connected cluster whose hardware key is the pair's (the pair's own host first)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.cloudpickle.register_pickle_by_value(remote)
    slots = {(s.node.node_id, s.nvme): s for n in list_nodes() for s in slots_of(n)
             if s.gpu == pair.gpu and s.nvme == pair.nvme}
    if not slots:
        raise UserError(f"no live host has a {'GPU' if pair.gpu else 'CPU-only'} slot"
                        f"{f' with NVMe device {pair.nvme}' if pair.nvme else ''} as pair {pair.describe()} ran on")
    task = ray.remote(remote.node_report)
    refs = {task.options(num_cpus=0, num_gpus=1 if s.gpu else 0, max_retries=0,
                         resources={f"nvme:{s.nvme}": 1} if s.nvme_is_resource else {},
                         scheduling_strategy=NodeAffinitySchedulingStrategy(s.node.node_id, soft=False)).remote(s.nvme): s
            for s in slots.values()}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=REPORT_TIMEOUT_S)
    for ref in pending:
        ray.cancel(ref, force=True)
    seen, matches = [], []
    for ref in ready:
        try:
            report = ray.get(ref, timeout=30)
        except Exception as e:  # a node that cannot report is no target
            log.warning("host %s did not report: %s", refs[ref].node.hostname, e)
            continue
        seen.append(f"{refs[ref].node.hostname}: {report['hardware_key']}")
        if report["hardware_key"] == pair.hardware_key:
            matches.append((refs[ref], report))
    if not matches:
        raise UserError(f"no live host has the pair's hardware {pair.hardware_key} (seen: {'; '.join(seen) or 'none'})"
                        "; bisect where the pair ran: --address of that cluster")
    slot, report = min(matches, key=lambda m: m[0].node.hostname != pair.row["host"])
    log.info("runs go to %s (%s)", slot.node.hostname, slot.key)
    return Target(slot.node.node_id, slot.node.hostname, slot.gpu, slot.nvme, slot.nvme_is_resource,
                  report["fingerprint"], report["cache_dir"])


class Runner:
    """`measure(commit)`: one run of the pair at that commit on the target slot, recorded as a row."""

    def __init__(self, choice: Choice, target: Target, repo: str, workdir: Path, uri: str, suite: str,
                 suite_run_id: str, flags: list[str], flat: dict[str, Any], timeout_s: float):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.choice, self.target, self.repo, self.workdir, self.uri = choice, target, repo, workdir, uri
        self.suite, self.suite_run_id, self.flags, self.flat, self.timeout_s = suite, suite_run_id, flags, flat, timeout_s
        self.model = choice.pair.model
        self.repeats: dict[str, int] = {}
        self.rows = 0
        ray.cloudpickle.register_pickle_by_value(remote)
        self.task = ray.remote(remote.run_point)
        self.options = {"num_cpus": 1, "num_gpus": 1 if target.gpu else 0, "max_retries": 0,
                        "resources": {f"nvme:{target.nvme}": 1} if target.nvme_resource else {},
                        "scheduling_strategy": NodeAffinitySchedulingStrategy(target.node_id, soft=False)}

    def measure(self, commit: str) -> Run:
        import ray
        from ray.exceptions import GetTimeoutError

        repeat = self.repeats.get(commit, 0)
        self.repeats[commit] = repeat + 1
        try:
            env = {"working_dir": self.package(commit), "env_vars": envs.engine_process_env()}
            ref = self.task.options(**self.options, runtime_env=env).remote(
                self.flags, model_arg(self.model), self.target.cache_dir, self.timeout_s)
            try:
                out = ray.get(ref, timeout=2 * self.timeout_s + SETUP_S)
            except GetTimeoutError:
                ray.cancel(ref, force=True)
                raise
        except Exception as e:  # the tree could not be shipped or the task died: a failed row with the reason
            out = {"status": "failed", "error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}",
                   "result": None, "started_at": None, "finished_at": None}
        row = self.record(commit, repeat, out)
        value = row[self.choice.metric.name] if row["status"] == "ok" else None
        error = row["error"] if row["status"] != "ok" else f"its result has no {self.choice.metric.name}"
        log.info("commit %s run %d: %s", commit[:12], repeat + 1,
                 f"{self.choice.metric.name} {value:.4g}" if value is not None else f"failed: {error}")
        return Run(value, None if value is not None else error)

    def package(self, commit: str) -> str:
        """The commit's tree in the cluster's GCS, as a working_dir URI (uploaded when not there)."""
        from ray._private.runtime_env.packaging import get_uri_for_package, package_exists, upload_package_to_gcs

        path = git.archive(self.repo, commit, self.workdir)
        uri = get_uri_for_package(path)
        if not package_exists(uri):
            upload_package_to_gcs(uri, path.read_bytes())
        return uri

    def record(self, commit: str, repeat: int, out: dict[str, Any]) -> dict[str, Any]:
        pair = self.choice.pair
        spec_hash = stable_hash({"config_key": pair.config_key, "hardware_key": pair.hardware_key, "commit": commit,
                                 "suite_run_id": self.suite_run_id})
        spec = RunSpec(self.suite, f"{spec_hash[:12]}-r{repeat}", spec_hash, pair.config_key, repeat, self.model,
                       pair.selector, self.flat, self.timeout_s)
        outcome = RunOutcome(out["status"], out["error"], out["result"], self.target.fingerprint, self.target.node_id,
                             out["started_at"], out["finished_at"], commit, False)
        row = build_row(spec, self.suite_run_id, outcome)
        row["hardware_key"] = pair.hardware_key  # the slot was matched on it; an old commit may describe it apart
        date = (row["finished_at"] or datetime.now(timezone.utc)).strftime("%Y-%m-%d")
        write_row(self.uri, row, self.suite, date)
        self.rows += 1
        return row


def model_arg(model: ModelSpec) -> dict[str, Any]:
    """The model as `remote.run_point` takes it; a preset's cache name is the actors' (shared cache)."""
    if model.path is not None:
        return {"path": model.path}
    return {"preset": model.preset, "layers": model.layers, "dtype": model.dtype, "seed": model.seed,
            "overrides": model.overrides, "cache_name": f"{model.preset}-{stable_hash(model.identity())[:10]}"}
