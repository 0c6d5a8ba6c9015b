#!/usr/bin/env python
"""Throughput of chess puzzle generation per candidate source and N (the `chess` section of task_generation.py).

    python bench/chess_generation.py                 # 24 games per source at max N = 2, 6 at N = 3 (~1 min idle)
    python bench/chess_generation.py --n 60 --json out.json

Each source makes candidate positions, and tasks/chess_gen.puzzles_from_game searches them for
verified puzzles (exhaustive search, at most one per game and N), exactly as the generator does:
- random:     self-play, both sides uniformly random (the baseline the issue measured);
- greedy:     one side mates in one if it can, else captures the most material; the other random
              (the generator's source);
- forcing:    both sides random, but half of the moves are drawn among checks and captures only;
- placement:  both kings and 2-4 random pieces for the side to move, 0-3 for the other, on random
              squares (legal positions only); one position per "game". Fast, but unrealistic.
Rates are per minute of this process's CPU time (time.process_time), so a loaded machine slows
the wall clock but not the numbers much; the script prints the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import chess
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import chess_gen as gen  # noqa: E402

BENCH_SEED = 12345  # a stream of its own, not the dataset's (seed 0)
SOURCES = ("random", "greedy", "forcing", "placement")


def forcing_game(rng: np.random.Generator) -> list[chess.Board]:
    board, positions = chess.Board(), []
    while not board.is_game_over() and board.ply() < gen.MAX_PLIES:
        positions.append(board.copy(stack=False))
        moves = list(board.generate_legal_moves())
        if rng.random() < 0.5:
            forcing = [m for m in moves if board.is_capture(m) or board.gives_check(m)]
            moves = forcing or moves
        board.push(moves[rng.integers(len(moves))])
    return positions


def placement(rng: np.random.Generator) -> list[chess.Board]:
    """One legal random placement: kings plus a few pieces, the side to move the stronger."""
    kinds = [chess.QUEEN, chess.ROOK, chess.ROOK, chess.BISHOP, chess.KNIGHT, chess.PAWN, chess.PAWN]
    while True:
        board = chess.Board.empty()
        turn = bool(rng.integers(2))
        squares = rng.permutation(64)
        board.set_piece_at(int(squares[0]), chess.Piece(chess.KING, turn))
        board.set_piece_at(int(squares[1]), chess.Piece(chess.KING, not turn))
        k = 2
        for color, count in ((turn, rng.integers(2, 5)), (not turn, rng.integers(0, 4))):
            for _ in range(count):
                board.set_piece_at(int(squares[k]), chess.Piece(kinds[rng.integers(len(kinds))], color))
                k += 1
        board.turn = turn
        if board.is_valid() and not board.is_game_over():
            return [board]


def candidates(source: str, rng: np.random.Generator) -> list[chess.Board]:
    if source in gen.POLICIES:
        return gen.play_game(rng, source)
    return forcing_game(rng) if source == "forcing" else placement(rng)


def run_source(source: str, max_n: int, games: int) -> dict:
    """Candidates searched and verified puzzles found per N over `games` games, with CPU seconds."""
    cpu = time.process_time()
    searched, over, found = 0, 0, {}
    for g in range(games):
        positions = candidates(source, np.random.default_rng([BENCH_SEED, SOURCES.index(source), max_n, g]))
        puzzles, stats = gen.puzzles_from_game(positions, g, max_n)
        searched += stats["searched"]
        over += stats["over_budget"]
        for p in puzzles:
            found[p.n] = found.get(p.n, 0) + 1
    cpu = time.process_time() - cpu
    return {"source": source, "max_n": max_n, "games": games, "cpu_s": cpu, "searched": searched,
            "over_budget": over, "found": found, "candidates_per_min": 60 * searched / cpu,
            "games_per_min": 60 * games / cpu, "per_min": {n: 60 * c / cpu for n, c in sorted(found.items())}}


def chess_report(n: int, workers: list[int] | None = None) -> dict:
    """Every source at max N = 2 on n games and at max N = 3 on n // 4 games (one process)."""
    report = {"n": n, "load_start": os.getloadavg(), "runs": []}
    for max_n, games in ((2, n), (3, max(1, n // 4))):
        for source in SOURCES:
            report["runs"].append(run_source(source, max_n, games))
    report["load_end"] = os.getloadavg()
    return report


def print_chess(r: dict) -> None:
    print(f"chess: load average {r['load_start'][0]:.2f} at start, {r['load_end'][0]:.2f} at end; "
          "rates per minute of one core's CPU time")
    print(f"  {'source':<10}{'max N':>6}{'games':>7}{'cpu s':>8}{'games/min':>10}{'cand/min':>10}"
          f"{'N=1/min':>9}{'N=2/min':>9}{'N=3/min':>9}{'skipped':>8}")
    for run in r["runs"]:
        rates = "".join(f"{run['per_min'].get(k, 0.0):>9.1f}" if k <= run["max_n"] else f"{'-':>9}"
                        for k in (1, 2, 3))
        print(f"  {run['source']:<10}{run['max_n']:>6}{run['games']:>7}{run['cpu_s']:>8.1f}"
              f"{run['games_per_min']:>10.1f}{run['candidates_per_min']:>10.0f}{rates}{run['over_budget']:>8}")
    print("  cand: positions searched (scanning each game from its end until it gave one puzzle per N);")
    print("  N=k/min: verified unique-key puzzles per minute; skipped: searches over the node budget")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=24, help="games per source at max N = 2 (a quarter at N = 3)")
    p.add_argument("--json", metavar="PATH", help="also write every number here")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error("--n must be >= 1")
    report = chess_report(args.n)
    print_chess(report)
    if args.json:
        Path(args.json).write_text(json.dumps({"chess": report}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
