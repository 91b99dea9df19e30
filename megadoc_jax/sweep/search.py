"""The self-recentring coordinate search: which runs to do next, from the results so far. Pure: no JAX, no files.

    space = Space(grids={"lr": (1e-3, 3e-3, 1e-2), "wd": (0.1, 0.4, 0.8)}, centre={"lr": 1e-3, "wd": 0.1})
    state = search(space, outcomes)      # outcomes: {point: Outcome.done(loss) or Outcome.failed()}
    state.to_run                         # points to run now (all of them may run in parallel)
    state.finished, state.best           # the search is over; the final centre and its loss

A point is a tuple of grid values, one per coordinate in the order of `Space.grids`. `search` is a pure
function of (space, outcomes): any worker, after any restart, recomputes the same state from the table.

The algorithm (the paper's coordinate search, recentring itself instead of by hand):

* Round k has a centre (round 1: `Space.centre`) and candidates: the centre, then for each coordinate in
  grid order its one-step grid neighbours (the grid value below, then the one above; a neighbour off the
  grid's end is left out). Every neighbour differs from the centre in one coordinate only: with four
  coordinates inside their grids, 9 runs a round, as in the reference stack.
* A round is resolved when every candidate has an outcome; until then `to_run` lists the candidates
  without one (in candidate order). Candidates already run in an earlier round (the previous centre is a
  neighbour of the new one) keep their outcome: no point is ever run twice.
* A resolved round moves the centre to the best candidate by objective (the i.i.d. held-out loss), if it
  improves on the centre: objective < centre's objective - min_improvement. Ties: the centre wins any tie
  (a neighbour must be strictly better); among neighbours with the same objective, the first in candidate
  order wins. Failed candidates are excluded from the comparison; a failed centre counts as +inf (any
  finished neighbour with a finite objective improves on it). A non-finite objective (a run that diverged)
  is +inf: a result, never an improvement.
* The search ends at the first resolved round whose centre no neighbour improves on: `best` is that
  centre. The centre's objective falls strictly from round to round, so no centre repeats and the
  search ends on every finite grid. If the final centre itself failed, the search ends with best = None.

Outcomes: `Outcome.done(objective)` for a finished run, `Outcome.failed()` for a run whose attempts are
spent (the worker retries a failed attempt up to the sweep's max_attempts before recording this). Points
without an outcome (never run, queued, running, or failed with attempts left) are to run.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping

Point = tuple[float, ...]  # one grid value per coordinate, in the order of Space.grids


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A final result of one point: done with an objective (+inf if it diverged), or failed for good."""

    status: str  # "done" or "failed"
    objective: float = math.inf

    @staticmethod
    def done(objective: float) -> Outcome:
        return Outcome("done", objective if math.isfinite(objective) else math.inf)

    @staticmethod
    def failed() -> Outcome:
        return Outcome("failed")


@dataclasses.dataclass(frozen=True)
class Space:
    """Grids (coordinate -> increasing values) and the first centre (coordinate -> one of its grid values)."""

    grids: dict[str, tuple[float, ...]]
    centre: dict[str, float]
    min_improvement: float = 0.0

    def __post_init__(self) -> None:
        if not self.grids:
            raise ValueError("grids: at least one coordinate is needed")
        for name, values in self.grids.items():
            if not values:
                raise ValueError(f"grids.{name}: is empty")
            if any(b <= a for a, b in zip(values, values[1:])):
                raise ValueError(f"grids.{name}: values must increase strictly, got {list(values)}")
        if set(self.centre) != set(self.grids):
            raise ValueError(f"centre: has coordinates {sorted(self.centre)}, the grids {sorted(self.grids)}")
        for name, value in self.centre.items():
            if value not in self.grids[name]:
                raise ValueError(f"centre.{name}: {value} is not in grids.{name} {list(self.grids[name])}")
        if not self.min_improvement >= 0:
            raise ValueError(f"min_improvement: must be >= 0, got {self.min_improvement}")

    @functools.cached_property
    def _index(self) -> tuple[dict[float, int], ...]:
        return tuple({value: i for i, value in enumerate(values)} for values in self.grids.values())

    @property
    def coordinates(self) -> tuple[str, ...]:
        return tuple(self.grids)

    @property
    def start(self) -> Point:
        return tuple(self.centre[name] for name in self.grids)

    def named(self, point: Point) -> dict[str, float]:
        """{coordinate: value} of a point."""
        return dict(zip(self.grids, point))

    def point(self, named: Mapping[str, float]) -> Point:
        """The point of {coordinate: value}; ValueError naming a coordinate that is missing or off its grid."""
        for name in self.grids:
            if name not in named:
                raise ValueError(f"point {dict(named)}: no value for {name}")
            if named[name] not in self.grids[name]:
                raise ValueError(f"point {dict(named)}: {name}={named[name]} is not in its grid")
        return tuple(named[name] for name in self.grids)

    def neighbours(self, centre: Point) -> list[Point]:
        """The one-step grid neighbours of `centre`, one coordinate at a time: coordinates in grid order,
        the lower neighbour before the higher."""
        out = []
        for axis, values in enumerate(self.grids.values()):
            index = self._index[axis][centre[axis]]
            for step in (-1, 1):
                if 0 <= index + step < len(values):
                    out.append(centre[:axis] + (values[index + step],) + centre[axis + 1 :])
        return out


@dataclasses.dataclass(frozen=True)
class Round:
    centre: Point
    candidates: tuple[Point, ...]  # the centre first, then its neighbours
    moved_to: Point | None  # the next centre; None while unresolved or when the search ended here


@dataclasses.dataclass(frozen=True)
class SearchState:
    rounds: tuple[Round, ...]  # every round so far; the last is the current one
    to_run: tuple[Point, ...]  # candidates of the current round without an outcome, in candidate order
    finished: bool
    best: Point | None  # the final centre (finished) or the current one (not finished; None if it failed)
    best_objective: float  # its objective (+inf if unknown)
    failed: tuple[Point, ...]  # points of any round that failed for good, excluded from comparisons

    @property
    def centre(self) -> Point:
        return self.rounds[-1].centre


def objective_of(outcome: Outcome | None) -> float:
    """What a candidate scores in comparisons: its objective if done, else +inf."""
    return outcome.objective if outcome is not None and outcome.status == "done" else math.inf


def choose(space: Space, centre: Point, candidates: tuple[Point, ...], outcomes: Mapping[Point, Outcome]) -> Point:
    """The next centre of a resolved round (the centre itself if no neighbour improves): module docstring."""
    best, best_score = centre, objective_of(outcomes[centre])
    threshold = best_score - space.min_improvement
    for point in candidates[1:]:
        score = objective_of(outcomes[point])
        if score < threshold and score < best_score:  # strict: the earlier of equal neighbours stays
            best, best_score = point, score
    return best


def search(space: Space, outcomes: Mapping[Point, Outcome]) -> SearchState:
    """Replays the search from the first centre over `outcomes` (module docstring): where it stands now."""
    rounds: list[Round] = []
    failed: dict[Point, None] = {}  # an ordered set: in the order the search met them
    centre = space.start
    while True:
        candidates = (centre, *space.neighbours(centre))
        to_run = tuple(p for p in candidates if p not in outcomes)
        failed |= {p: None for p in candidates if p in outcomes and outcomes[p].status == "failed"}
        if to_run:
            rounds.append(Round(centre, candidates, None))
            current = outcomes.get(centre)
            best = centre if current is None or current.status == "done" else None
            return SearchState(tuple(rounds), to_run, False, best, objective_of(current), tuple(failed))
        moved_to = choose(space, centre, candidates, outcomes)
        if moved_to == centre:
            rounds.append(Round(centre, candidates, None))
            best = centre if outcomes[centre].status == "done" else None
            return SearchState(tuple(rounds), (), True, best, objective_of(outcomes[centre]), tuple(failed))
        rounds.append(Round(centre, candidates, moved_to))
        centre = moved_to
