"""Each method at its best learning rate, chosen the same way for all, before the seeds run.

The search: every tuned arm (each method of the matrix, and ``single``) trains once per search seed (seed 0;
``--search-seeds N``: seeds 0..N-1) on the main suite with the main budget, at each rate of its grid; the
rate with the best validation average wins:

    score(arm, lr) = mean over the search seeds of val_best  (the best ``val/average`` of a run, the one
                                                              its tested checkpoint was chosen by)
    score(single, lr) = the same, also averaged over the suite's tasks t of the ``single`` runs on t
    chosen(arm)    = argmax_lr score(arm, lr)                (a tie goes to the smaller rate)

Only validation splits are read: no test score enters the choice. The seeds then run at the chosen rate,
and the search seeds' cells at that rate *are* the search runs (same arguments, same run id), so they are not
run twice. One search seed picks whichever rate its seed survived: a rate at the edge of stability can win on
seed 0 and collapse on others (docs/results.md); more search seeds make the choice robust to that.

- Grids: ``Scale.lr_grid`` (3e-4, 1e-3, 3e-3; the default job's 1e-3 in the middle, HyperFormer's 3e-4 at
  the bottom) for every LoRA method; ``full_ft`` trains the whole encoder and has its own grid around the
  BERT fine-tuning rates (2e-5 .. 1e-4, ``ARM_LR_GRIDS``). The rate replaces ``model.optim.lr`` (adapters and
  method modules); the heads keep ``model.optim.head_lr`` (1e-3), the same for every method.
- Widening (``Scale.lr_widen``, ``--lr-widen N``): when an arm's best rate is at an end of its grid, every
  rate of it scored, the best may lie beyond it. The next rate past that end (:func:`beyond`: one more step
  of the grid's own ratio there, on the 1-2-3-5 ladder: 3e-3 -> 1e-2 -> 3e-2, full_ft's 1e-4 -> 2e-4) joins
  that arm's search, up to N rates past its grid; the choice is then over every rate it ran. The same rule
  for every arm, read from validation scores only; the cpu matrix at 800 steps had five arms chosen at the
  top of the grid (docs/results.md).
- The Table 7 ablations are not searched: each runs at the spectral method's chosen rate, so that an
  ablation changes one thing. Few-shot and one-task cells run at the arm's rate chosen on the main suite.
- An arm whose search runs all failed has no choice: its cells run at its configs' rate, and the report
  says so (``Choice.note``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from speclora.bench.quality_scales import REFERENCE, SPECTRAL, Cell, CellFactory, Scale, fmt_rate

# full fine-tuning of the encoder: BERT's 2e-5..5e-5 (Devlin et al. 2019, §A.3) and one step above for the
# small MiniLM; configs/methods/full_ft.yaml's 5e-5 in the middle
ARM_LR_GRIDS: dict[str, tuple[float, ...]] = {"full_ft": (2e-5, 5e-5, 1e-4)}
# the rates a widened grid steps on: 1, 2, 3 and 5 per decade (every grid above lies on it)
LADDER = (1.0, 2.0, 3.0, 5.0, 10.0)

Row = Mapping[str, Any]


def parse_grid(text: str) -> tuple[float, ...]:
    """``--lr-grid``: a comma list of positive rates.

    Raises:
        ValueError: naming the flag, the value given and what is allowed.
    """
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"--lr-grid={text!r}; allowed: a comma list of positive numbers (e.g. 3e-4,1e-3,3e-3), "
                         "or 'none' to run every arm at its configs' rate")
    return tuple(sorted(set(values)))


def tuned_arm(arm: str) -> str:
    """The arm whose search sets this arm's rate: an ablation ``speclora/<x>`` takes the spectral method's."""
    return SPECTRAL if "/" in arm else arm


def tuned_arms(arms: Sequence[str], reference: bool = True) -> list[str]:
    """The arms searched for a selection of arms: its methods (the spectral method for any ablation), and
    single (unless ``reference`` is False: no single cells)."""
    out: list[str] = []
    for arm in arms:
        if tuned_arm(arm) not in out:
            out.append(tuned_arm(arm))
    return [*out, REFERENCE] if reference else out


def grid_of(arm: str, grid: Sequence[float]) -> tuple[float, ...]:
    return ARM_LR_GRIDS.get(arm, tuple(grid))


def search_cells(scale: Scale, arms: Sequence[str], grid: Sequence[float], make: CellFactory,
                 suite: Sequence[str], reference: bool = True, seeds: int = 1) -> tuple[Cell, ...]:
    """The search runs: every tuned arm at every rate of its grid, seeds 0..``seeds``-1 (``--search-seeds``;
    1: seed 0 alone), the main suite and budget.

    Ordered rate by rate, the highest first (each arm's i-th highest rate, then the next): a search stopped
    early holds whole rates, and ``--lr-grid`` without the missing ones reuses every finished run.
    """
    if seeds < 1:
        raise ValueError(f"--search-seeds={seeds}; allowed: an integer >= 1")
    grids = {arm: sorted(grid_of(arm, grid), reverse=True) for arm in tuned_arms(arms, reference)}
    cells: list[Cell] = []
    for i in range(max(len(g) for g in grids.values())):
        for arm, rates_of_arm in grids.items():
            if i < len(rates_of_arm):
                cells += rate_cells(scale, make, arm, rates_of_arm[i], suite, seeds)
    return tuple(cells)


def rate_cells(scale: Scale, make: CellFactory, arm: str, lr: float, suite: Sequence[str],
               seeds: int = 1) -> list[Cell]:
    """The search runs of one arm at one rate: seeds 0..``seeds``-1, on the suite (single: on each task)."""
    overlay = scale.overlay(make.configs)
    cells = []
    for seed in range(seeds):
        if arm == REFERENCE:
            cells += [make.cell("single", REFERENCE, seed, [t], overlay, lr) for t in suite]
        else:
            cells.append(make.cell("main", arm, seed, list(suite), overlay, lr))
    return cells


def snap(lr: float) -> float:
    """``lr`` rounded to the nearest rate of the 1-2-3-5 ladder (``LADDER``, log distance): 9e-3 -> 1e-2."""
    base = 10.0 ** math.floor(math.log10(lr))
    mantissa = min(LADDER, key=lambda m: abs(math.log(lr / (m * base))))
    return float(f"{mantissa * base:.0e}")  # 3e-3, not 0.0030000000000000005


def beyond(rates: Sequence[float], edge: str) -> float:
    """The next rate past the ``edge`` ("highest" or "lowest") end of a grid of two or more rates: one more
    step of the grid's own ratio at that end, snapped to the ladder. (3e-4, 1e-3, 3e-3): 1e-2 past the highest,
    1e-4 past the lowest; (2e-5, 5e-5, 1e-4): 2e-4 past the highest."""
    g = sorted(rates)
    if len(g) < 2 or edge not in ("highest", "lowest"):
        raise ValueError(f"beyond({list(rates)}, {edge!r}); allowed: two or more rates and 'highest' or 'lowest'")
    end, step = (g[-1], g[-1] / g[-2]) if edge == "highest" else (g[0], g[0] / g[1])
    lr = snap(end * step)
    # a grid finer than the ladder (1e-3, 1.1e-3) would snap back onto its end: step past it unrounded
    return lr if (lr > end if edge == "highest" else lr < end) else float(f"{end * step:.2g}")


def widened(cells: Sequence[Cell], rows: Callable[[Sequence[Cell]], Mapping[str, Row]], grid: Sequence[float],
            widen: int, cells_at: Callable[[str, float], Sequence[Cell]]) -> tuple[Cell, ...]:
    """The search cells with every widening their finished results call for (``rows``: cells -> run id ->
    result, read when needed; ``cells_at(arm, lr)``: an arm's search runs at a rate, :func:`rate_cells`).

    While an arm's choice is at an end of its grid (:func:`at_edge`: every rate scored) and fewer than
    ``widen`` rates were added past its grid (``grid_of``), the next rate past that end joins it. A rate not
    scored yet (not run, or failed) ends the arm's widening until it is, so the same finished runs always give
    the same cells: a stopped search resumes where it was.
    """
    out = list(cells)
    while True:
        added: list[Cell] = []
        for arm, choice in choose(out, rows(out)).items():
            edge = at_edge(choice)
            past = [lr for lr in choice.scores if lr not in grid_of(arm, grid)]
            if edge and len(past) < widen:
                added += cells_at(arm, beyond(list(choice.scores), edge))
        if not added:
            return tuple(out)
        out += added


@dataclass(frozen=True)
class Choice:
    """The search of one arm: its validation score at each rate (None: no ok run), and the chosen rate."""

    arm: str
    scores: dict[float, float | None]
    lr: float | None
    note: str = ""
    failed: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"arm": self.arm, "scores": [[lr, s] for lr, s in self.scores.items()], "lr": self.lr,
                "note": self.note, "failed": list(self.failed)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Choice:
        return cls(d["arm"], {float(lr): s for lr, s in d["scores"]}, d["lr"], d.get("note", ""),
                   list(d.get("failed", [])))


def _val(row: Row | None) -> float | None:
    if row is None or row.get("status") != "ok":
        return None
    v = row.get("val_best")
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def choose(cells: Sequence[Cell], rows: Mapping[str, Row]) -> dict[str, Choice]:
    """arm -> its :class:`Choice`, from the search cells and their results (``rows``: run id -> result)."""
    by_arm: dict[str, dict[float, list[Cell]]] = {}
    for c in cells:
        by_arm.setdefault(c.arm, {}).setdefault(float(c.lr), []).append(c)
    out = {}
    for arm, per_lr in by_arm.items():
        scores: dict[float, float | None] = {}
        failed = []
        for lr, group in sorted(per_lr.items()):
            values = [_val(rows.get(c.run_id)) for c in group]
            failed += [c.run_id for c in group if (rows.get(c.run_id) or {}).get("status") == "failed"]
            # a single's score needs every task of the suite: a mean over fewer tasks is another number
            scores[lr] = sum(values) / len(values) if all(v is not None for v in values) else None
        scored = [(v, -lr) for lr, v in scores.items() if v is not None]
        if scored:
            best = max(scored)
            out[arm] = Choice(arm, scores, -best[1], "", failed)
        elif failed:
            out[arm] = Choice(arm, scores, None, f"every search run failed ({len(failed)})",
                              failed)
        else:
            out[arm] = Choice(arm, scores, None, "search not run yet")
    return out


def rates(arms: Sequence[str], choices: Mapping[str, Choice]) -> dict[str, float | None]:
    """arm (every selected arm, ablations included, and single) -> the rate its cells run at."""
    out = {}
    for arm in [*arms, REFERENCE]:
        choice = choices.get(tuned_arm(arm))
        out[arm] = choice.lr if choice is not None else None
    return out


def fmt_lr(lr: float | None) -> str:
    return "configs' rate" if lr is None else fmt_rate(lr)


def seeds_text(seeds: int | None) -> str:
    """What a search's score is over, in words: "seed 0", or "the mean over seeds 0–N-1"."""
    return "seed 0" if (seeds or 1) == 1 else f"the mean over seeds 0–{seeds - 1}"


def rate_line(meta: Mapping[str, Any]) -> str:
    """The report's learning-rate line, from a matrix's meta.json (``lr_grid``, ``lr_widen``, ``search_seeds``;
    a matrix from before widening existed has no ``lr_widen``: its grid was fixed)."""
    if not meta.get("lr_grid"):
        return "every method at its configs' rate (no search: `--lr-grid none`)"
    widen = meta.get("lr_widen") or 0
    return (f"chosen per method on the validation split from the grid {_grid(meta['lr_grid'])} (full_ft: "
            f"{_grid(ARM_LR_GRIDS['full_ft'])})" + (
                f", widened by up to {widen} rate{'s' if widen > 1 else ''} past an end of a method's grid while its "
                "best rate was at that end" if widen else "") +
            f", {seeds_text(meta.get('search_seeds'))}, the same budget; then every seed at the chosen rate; the "
            "Table 7 ablations at speclora's rate; no test score enters the choice")


def _grid(grid: Sequence[float]) -> str:
    return "{" + ", ".join(fmt_rate(g) for g in grid) + "}"


def at_edge(choice: Choice) -> str:
    """"highest" or "lowest" when the chosen rate is at that end of a grid of two or more rates, every one of
    them scored (the best rate may then lie outside the grid); "" otherwise."""
    if choice.lr is None or len(choice.scores) < 2 or None in choice.scores.values():
        return ""
    return "highest" if choice.lr == max(choice.scores) else "lowest" if choice.lr == min(choice.scores) else ""


def search_table(choices: Mapping[str, Mapping[str, Any]], order: Sequence[str], seeds: int = 1) -> str:
    """Markdown: per tuned arm, its validation score at each rate of its grid (mean over the search's seeds)
    and the chosen rate; a rate chosen at an end of its grid is marked, and named below the table."""
    lines = [f"| method | validation average at each rate ({seeds_text(seeds)}; chosen in bold) | chosen rate | runs at it |",
             "| --- | --- | --- | --- |"]
    edges = []
    for arm in [a for a in order if a in choices]:
        c = Choice.from_json(choices[arm])
        cells = []
        for lr, v in c.scores.items():
            text = f"{fmt_rate(lr)}: " + ("failed" if v is None and c.failed else "–" if v is None else f"{v:.1f}")
            cells.append(f"**{text}**" if lr == c.lr else text)
        runs_at = "every cell" if arm != SPECTRAL else "every cell, and the Table 7 ablations"
        edge = at_edge(c)
        note = c.note or (f"the {edge} of its grid" if edge else "")
        lines.append(f"| {arm} | {' · '.join(cells)} | {fmt_lr(c.lr)}{' (' + note + ')' if note else ''} "
                     f"| {runs_at} |")
        if edge:
            edges.append(f"{arm} ({edge})")
    if edges:
        lines += ["", f"Chosen at an end of the grid: {', '.join(edges)}. The best rate may lie beyond it; a rerun with "
                  "more rates past that end (`--lr-widen`, or `--lr-grid`; full_ft's grid: `ARM_LR_GRIDS` in "
                  "speclora/bench/quality_search.py) reuses every finished run and trains only the new rates."]
    return "\n".join(lines)
