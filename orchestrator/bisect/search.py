"""The search of `bench bisect`: the good and the bad commit first, then a binary search over the
commits between them, each judged with the noise test of `bench regress`.

Pure logic over a `measure(commit) -> Run` function (one run of the point at that commit), so it is
tested without Ray or git. The references are measured in this session, on the same host, so the
search compares like with like: R repeats of good and bad, interleaved (drift hits both alike). Bad
must be beyond the noise of good in the metric's worse direction (`assess`, unit "repeat"), with
more repeats of both up to `max_repeats` while it looks worse but not yet beyond; otherwise the
regression is "not reproduced".

A commit between is bad when it is beyond the noise of good in the worse direction and not beyond
the noise of bad in the better one; good in the mirror case. Neither: more repeats, up to
`max_repeats`, then the closer median decides (and the verdict says so). Both at once (it sits
between good and bad: part of the slowdown, or two commits that each add some) decides by the closer
median at once, since repeats cannot resolve it. A commit whose first run fails is skipped, like
`git bisect skip`; when skips leave the boundary unknown, the outcome names the candidates.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Callable, Literal

from orchestrator.regress.stats import Change, assess

log = logging.getLogger(__name__)

MIN_VALUES = 2  # a reference needs a spread: two values at least
Status = Literal["found", "not-reproduced", "undecided"]


@dataclass(frozen=True)
class Run:
    """One measurement: the metric's value, or why there is none."""

    value: float | None
    error: str | None = None


@dataclass
class Judged:
    """A commit with its runs and the verdict on it."""

    commit: str
    values: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    vs_good: Change | None = None
    vs_bad: Change | None = None
    verdict: Literal["good", "bad", "skip", ""] = ""
    how: str = ""  # "reference", "noise test", "closer median: ...", the error of a skipped commit

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def tries(self) -> int:
        return len(self.values) + len(self.errors)

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None


@dataclass
class Outcome:
    status: Status
    first_bad: str | None
    candidates: list[str]  # the commits the first bad one is among (one when found)
    judged: list[Judged]  # good, bad, then each commit in the order tested
    message: str


@dataclass(frozen=True)
class Settings:
    repeats: int = 3
    max_repeats: int = 8
    z: float = 3.0
    noise_floor: float = 0.005


def search(commits: list[str], measure: Callable[[str], Run], sign: int, settings: Settings = Settings()) -> Outcome:
    """Bisect `commits` (oldest first: good, the commits between, bad) for the first bad one.

    `sign` is the metric's (+1: a rise is worse). Raises ValueError on fewer than two commits or
    repeats below MIN_VALUES (the caller validates user input)."""
    if len(commits) < 2:
        raise ValueError("need a good and a bad commit")
    if settings.repeats < MIN_VALUES or settings.max_repeats < settings.repeats:
        raise ValueError(f"repeats must be >= {MIN_VALUES} and <= max_repeats")
    return _Search(commits, measure, sign, settings).run()


class _Search:
    def __init__(self, commits: list[str], measure: Callable[[str], Run], sign: int, settings: Settings):
        self.commits, self.measure, self.sign, self.s = commits, measure, sign, settings
        self.good, self.bad = Judged(commits[0]), Judged(commits[-1])
        self.judged = [self.good, self.bad]

    def run(self) -> Outcome:
        problem = self.references()
        if problem is not None:
            return problem
        lo, hi, skipped = 0, len(self.commits) - 1, set()
        while hi - lo > 1:
            mid = _pick(lo, hi, skipped)
            if mid is None:
                between = self.commits[lo + 1:hi + 1]
                return self.outcome("undecided", None, between,
                                    f"the first bad commit is one of {len(between)} (the others between could not "
                                    "be measured)")
            j = self.judge(self.commits[mid])
            if j.verdict == "skip":
                skipped.add(mid)
            elif j.verdict == "good":
                lo = mid
            else:
                hi = mid
        first = self.commits[hi]
        return self.outcome("found", first, [first], f"first bad commit: {first}")

    # ---- the references ---------------------------------------------------------------------

    def references(self) -> Outcome | None:
        """Measure good and bad until bad is beyond good's noise; an Outcome when that fails."""
        for _ in range(self.s.repeats):
            for ref in (self.good, self.bad):
                self.take(ref)
            if not (self.good.values and self.bad.values):  # a reference whose first run failed: no bisection
                break
        for ref, name in ((self.good, "good"), (self.bad, "bad")):
            if ref.n < MIN_VALUES:
                ref.verdict, ref.how = "skip", (ref.errors[-1] if ref.errors else "no values")
                return self.outcome("undecided", None, [], f"the {name} commit {ref.commit[:12]} could not be measured "
                                                          f"({ref.n} of {ref.n + len(ref.errors)} runs ok): {ref.how}")
        while True:
            change = self.compare(self.good, self.bad)
            if change is not None and change.z > change.critical:
                break
            if change is None or change.z <= 0 or self.good.tries >= self.s.max_repeats:
                self.good.verdict, self.good.how = "good", "reference"
                self.bad.how = "not beyond the noise of good"
                self.bad.vs_good, self.good.vs_bad = change, self.compare(self.bad, self.good)
                z = "n/a" if change is None else f"{change.z:+.1f}, critical {change.critical:.1f}"
                return self.outcome("not-reproduced", None, [],
                                    f"not reproduced: the bad commit is not beyond the noise of the good one in the "
                                    f"worse direction (z {z}; {self.good.n} vs {self.bad.n} runs)")
            self.take(self.good)
            self.take(self.bad)
        self.good.verdict, self.bad.verdict = "good", "bad"
        self.good.how = self.bad.how = "reference"
        self.bad.vs_good, self.good.vs_bad = change, self.compare(self.bad, self.good)
        return None

    # ---- one commit between -----------------------------------------------------------------

    def judge(self, commit: str) -> Judged:
        j = Judged(commit)
        self.judged.append(j)
        for _ in range(self.s.repeats):
            self.take(j)
            if not j.values:  # its first run failed: this commit cannot be measured
                j.verdict, j.how = "skip", j.errors[-1]
                return j
        while True:
            j.vs_good, j.vs_bad = self.compare(self.good, j), self.compare(self.bad, j)
            worse = j.vs_good is not None and j.vs_good.z > j.vs_good.critical
            better = j.vs_bad is not None and -j.vs_bad.z > j.vs_bad.critical
            if worse != better:
                j.verdict, j.how = ("bad" if worse else "good"), "noise test"
                break
            if worse or j.tries >= self.s.max_repeats:
                why = "beyond the noise of both" if worse else f"within the noise of both after {j.n} runs"
                j.verdict = "bad" if self.closer_to_bad(j) else "good"
                j.how = f"closer median: {why}"
                break
            self.take(j)
        log.info("commit %s: %s (%s), median %.4g over %d runs", commit[:12], j.verdict, j.how, j.median, j.n)
        return j

    # ---- helpers ----------------------------------------------------------------------------

    def take(self, j: Judged) -> None:
        run = self.measure(j.commit)
        if run.value is None:
            j.errors.append(run.error or "no value")
        else:
            j.values.append(float(run.value))

    def compare(self, base: Judged, cur: Judged) -> Change | None:
        return assess([base.values], cur.values, self.sign, z=self.s.z, unit="repeat", min_values=MIN_VALUES,
                      noise_floor=self.s.noise_floor)

    def closer_to_bad(self, j: Judged) -> bool:
        return abs(j.median - self.bad.median) < abs(j.median - self.good.median)

    def outcome(self, status: Status, first: str | None, candidates: list[str], message: str) -> Outcome:
        return Outcome(status, first, candidates, self.judged, message)


def _pick(lo: int, hi: int, skipped: set[int]) -> int | None:
    """The untested index strictly between lo and hi nearest their middle (None: all skipped)."""
    mid = (lo + hi) // 2
    for offset in range(hi - lo):
        for i in (mid - offset, mid + offset + 1):
            if lo < i < hi and i not in skipped:
                return i
    return None
