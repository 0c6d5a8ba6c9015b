"""Sudoku's grid, its exact solver and the puzzle generator, in plain Python (no torch).

The solver propagates singles over candidate bitmasks and branches on the cell with the fewest
candidates; the number of guesses it needs is a puzzle's difficulty (tasks.sudoku's buckets).
The generator fills a random grid and digs cells while the solution stays unique.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ------------------------------------------------------------------------------ the grid

# cells are numbered 0..80 row by row; units 0-8 rows, 9-17 columns, 18-26 boxes
UNITS = tuple(tuple(r * 9 + c for c in range(9)) for r in range(9)) \
    + tuple(tuple(r * 9 + c for r in range(9)) for c in range(9)) \
    + tuple(tuple((3 * br + r) * 9 + 3 * bc + c for r in range(3) for c in range(3))
            for br in range(3) for bc in range(3))
CELL_UNITS = tuple((i // 9, 9 + i % 9, 18 + 3 * (i // 27) + (i % 9) // 3) for i in range(81))
PEERS = tuple(tuple(sorted({j for u in CELL_UNITS[i] for j in UNITS[u]} - {i})) for i in range(81))
ALL = 0x1FF  # candidate bitmask: bit d-1 set when digit d is possible
_POPCOUNT = tuple(bin(m).count("1") for m in range(512))
_DIGIT = {1 << k: k + 1 for k in range(9)}

BUCKETS = ((0, 0), (1, 2), (3, 9), (10, None))  # guesses per bucket id, inclusive (None: no upper bound)


def bucket_of(guesses):
    """Bucket id 0-3 of a guess count (int or array)."""
    g = np.asarray(guesses)
    b = (g >= 1).astype(np.int64) + (g >= 3) + (g >= 10)
    return int(b) if b.ndim == 0 else b


# ------------------------------------------------------------------------------ the solver
# State: grid (81 digits, 0 blank), cand (81 masks, 0 on filled cells), placed (27 unit masks).

def _state(puzzle) -> tuple[list, list, list] | None:
    """The solver state of a puzzle, or None if two givens clash."""
    placed = [0] * 27
    for i, d in enumerate(puzzle):
        if d:
            b, (r, c, x) = 1 << (d - 1), CELL_UNITS[i]
            if (placed[r] | placed[c] | placed[x]) & b:
                return None
            placed[r] |= b
            placed[c] |= b
            placed[x] |= b
    cand = [0 if d else ALL & ~(placed[r] | placed[c] | placed[x]) for d, (r, c, x) in zip(puzzle, CELL_UNITS)]
    return list(puzzle), cand, placed


def _assign(grid: list, cand: list, placed: list, i: int, b: int) -> None:
    grid[i] = _DIGIT[b]
    cand[i] = 0
    nb = ~b
    for p in PEERS[i]:
        cand[p] &= nb
    r, c, x = CELL_UNITS[i]
    placed[r] |= b
    placed[c] |= b
    placed[x] |= b


def _propagate(grid: list, cand: list, placed: list) -> bool:
    """Naked and hidden singles to a fixpoint, in place; False on a contradiction."""
    while True:
        changed = False
        for i in range(81):  # naked singles; an empty cell without candidates is a contradiction
            m = cand[i]
            if not m & (m - 1):
                if m:
                    _assign(grid, cand, placed, i, m)
                    changed = True
                elif not grid[i]:
                    return False
        for u in range(27):  # hidden singles: digits with exactly one place in the unit
            unit = UNITS[u]
            once = twice = 0
            for i in unit:
                m = cand[i]
                twice |= once & m
                once |= m
            if once | placed[u] != ALL:  # a digit with no place left
                return False
            single = once & ~twice
            while single:
                b = single & -single
                single ^= b
                for i in unit:
                    if cand[i] & b:
                        break
                else:  # its one cell was just taken by another hidden single
                    return False
                _assign(grid, cand, placed, i, b)
                changed = True
        if not changed:
            return True


def _branch_cell(cand: list) -> int:
    """The empty cell with the fewest candidates, ties by lowest index; -1 if none is empty."""
    best, fewest = -1, 10
    for i in range(81):
        m = cand[i]
        if m:
            k = _POPCOUNT[m]
            if k < fewest:
                best, fewest = i, k
                if k == 2:  # after propagation no empty cell has fewer
                    break
    return best


def _search(grid: list, cand: list, placed: list, found: list, limit: int) -> None:
    """Depth-first search; found = [solutions, branch nodes, first solution], stops at `limit` solutions."""
    if not _propagate(grid, cand, placed):
        return
    i = _branch_cell(cand)
    if i < 0:
        found[0] += 1
        if found[0] == 1:
            found[2] = grid
        return
    found[1] += 1
    m = cand[i]
    while m:
        b = m & -m
        m ^= b
        g, c, p = grid[:], cand[:], placed[:]
        _assign(g, c, p, i, b)
        _search(g, c, p, found, limit)
        if found[0] >= limit:
            return


@dataclass(frozen=True)
class Analysis:
    """What the fixed solver found: guesses = branch nodes of the whole tree (partial if n_solutions is 2)."""

    guesses: int
    n_solutions: int  # 0, 1, or 2 meaning "at least 2" (the search stops there)
    solution: tuple[int, ...] | None  # the first solution found (the unique one when n_solutions is 1)

    @property
    def bucket(self) -> int:
        return bucket_of(self.guesses)


def analyse(puzzle) -> Analysis:
    """Solve `puzzle` (81 ints, 0 blank) with singles + fewest-candidate branching, counting guesses."""
    puzzle = [int(d) for d in puzzle]
    if len(puzzle) != 81 or not all(0 <= d <= 9 for d in puzzle):
        raise ValueError("a puzzle is 81 integers in 0..9")
    state = _state(puzzle)
    if state is None:
        return Analysis(0, 0, None)
    found = [0, 0, None]
    _search(*state, found, limit=2)
    return Analysis(found[1], found[0], tuple(found[2]) if found[2] else None)


def _random_solution(grid: list, cand: list, placed: list, rng: np.random.Generator) -> list | None:
    """A solution found with a random value order at each branch node, or None."""
    if not _propagate(grid, cand, placed):
        return None
    i = _branch_cell(cand)
    if i < 0:
        return grid
    bits = [1 << k for k in range(9) if cand[i] >> k & 1]
    for j in rng.permutation(len(bits)):
        g, c, p = grid[:], cand[:], placed[:]
        _assign(g, c, p, i, bits[j])
        solution = _random_solution(g, c, p, rng)
        if solution is not None:
            return solution
    return None


def _another_solution(puzzle: list, i: int, d: int) -> bool:
    """Whether `puzzle` (cell i blank, its solution digit d) has a solution with another digit at i."""
    grid, cand, placed = _state(puzzle)
    b = 1 << (d - 1)
    if cand[i] == b:  # the givens force d: blanking i keeps the solution unique (the common case early on)
        return False
    cand[i] &= ~b
    found = [0, 0, None]
    _search(grid, cand, placed, found, limit=1)
    return found[0] > 0


def make_puzzle(rng: np.random.Generator) -> tuple[list[int], list[int], int]:
    """A minimal puzzle with a unique solution by random digging: (puzzle, solution, guesses)."""
    solution = _random_solution([0] * 81, [ALL] * 81, [0] * 27, rng)
    puzzle = list(solution)
    for i in rng.permutation(81):
        d, puzzle[i] = puzzle[i], 0
        if _another_solution(puzzle, int(i), d):
            puzzle[i] = d
    result = analyse(puzzle)
    if result.n_solutions != 1 or list(result.solution) != solution:  # the digging guarantees both
        raise AssertionError(f"generated puzzle is not uniquely solvable: {puzzle}")
    return puzzle, solution, result.guesses


def canonical(puzzles: np.ndarray) -> np.ndarray:
    """Puzzles (N, 81) with digits relabelled in order of first appearance: equal iff equal up to relabelling."""
    puzzles = np.asarray(puzzles)
    present = puzzles[:, :, None] == np.arange(1, 10)  # (N, 81, 9)
    first = np.where(present.any(1), present.argmax(1), 81)  # (N, 9): first cell of each digit
    rank = np.argsort(np.argsort(first, axis=1, kind="stable"), axis=1)  # new label - 1 of each digit
    lut = np.concatenate([np.zeros((len(puzzles), 1), np.int64), rank + 1], axis=1)  # (N, 10)
    return np.take_along_axis(lut, puzzles.astype(np.int64), axis=1).astype(np.uint8)
