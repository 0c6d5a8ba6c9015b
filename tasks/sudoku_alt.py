"""A second sudoku generator, built differently from `tasks.sudoku.make_puzzle` on purpose, to test
that a trained model does not depend on how our generator makes its puzzles.

    puzzle, solution = alt_puzzle(np.random.default_rng(0), givens=32)

`tasks.sudoku` searches a random full grid by backtracking, then digs cells one at a time in
random order down to a minimal puzzle (21-28 givens). This one:
- starts from the pattern grid `(3 * (r % 3) + r // 3 + c) % 9 + 1` and applies random sudoku
  symmetries: digit relabelling, rows within bands, bands, columns within stacks, stacks, and a
  transposition (the same family as newspaper generators that shuffle a seed grid);
- digs cells in pairs symmetric under the 180-degree rotation (the classic published-puzzle
  look), in random order, skipping a pair whose removal makes a second solution, and stops at
  the requested number of givens: any number from 17 up, not a minimal puzzle.
If digging gets stuck above the target (every remaining pair is needed), the puzzle keeps more
givens than asked; `alt_puzzle` returns the actual puzzle, and callers read its count.
Uniqueness is checked with the sudoku module's exact search (a fact about the puzzle, not a
choice of the generator).
"""

from __future__ import annotations

import numpy as np

from .sudoku_solver import _search, _state


def _shuffled_grid(rng: np.random.Generator) -> np.ndarray:
    grid = np.array([[(3 * (r % 3) + r // 3 + c) % 9 + 1 for c in range(9)] for r in range(9)])
    digits = np.concatenate([[0], rng.permutation(9) + 1])
    grid = digits[grid]
    order = lambda: np.concatenate([3 * b + rng.permutation(3) for b in rng.permutation(3)])
    grid = grid[order()][:, order()]
    return grid.T.copy() if rng.random() < 0.5 else grid


def _unique(puzzle: list[int]) -> bool:
    state = _state(puzzle)
    if state is None:
        return False
    found = [0, 0, None]
    _search(*state, found, limit=2)
    return found[0] == 1


def alt_puzzle(rng: np.random.Generator, givens: int) -> tuple[list[int], list[int]]:
    """(puzzle, solution), 81 ints each (0 blank), with a unique solution and `givens` givens
    where symmetric digging can get that low (else more: read the count off the puzzle)."""
    if not 17 <= givens <= 81:
        raise ValueError(f"givens must be in 17..81, got {givens}")
    solution = _shuffled_grid(rng).flatten().tolist()
    puzzle = list(solution)
    pairs = [(i, 80 - i) for i in range(41)]  # cell 40 (the centre) pairs with itself
    for k in rng.permutation(len(pairs)):
        i, j = pairs[k]
        n_removed = 1 if i == j else 2
        if sum(d > 0 for d in puzzle) - n_removed < givens:
            continue
        old = puzzle[i], puzzle[j]
        puzzle[i] = puzzle[j] = 0
        if not _unique(puzzle):
            puzzle[i], puzzle[j] = old
    return puzzle, solution


def alt_pool(n: int, givens: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
    """n puzzles with a target number of givens drawn uniformly from `givens` (inclusive); puzzle k
    draws from np.random.default_rng([seed, k]). Returns uint8 puzzles and solutions (n, 81)."""
    puzzles, solutions = [], []
    for k in range(n):
        rng = np.random.default_rng([seed, k])
        p, s = alt_puzzle(rng, int(rng.integers(givens[0], givens[1] + 1)))
        puzzles.append(p)
        solutions.append(s)
    return {"puzzles": np.array(puzzles, np.uint8), "solutions": np.array(solutions, np.uint8)}
