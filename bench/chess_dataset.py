"""What the chess dataset holds: puzzles per split, source and N, with piece-count and material spreads.

    .venv/bin/python bench/chess_dataset.py [tasks/data/chess/puzzles.npz] [--human]

Per (split, source, N): puzzles, games, pieces on the board (mean, p10-p90), the mover's material
minus the opponent's (P=1, N=B=3, R=5, Q=9; mean, p10-p90), and the share whose key a depth-1
material search already ranks first (`depth` 1: a capture or a mate the static score sees).
`--human` adds the human-game set (tasks/data/chess/human_puzzles.csv).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import chess
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.chess import DATA, Chess  # noqa: E402
from tasks.chess_gen import VALUE  # noqa: E402


def spread(fens) -> tuple[np.ndarray, np.ndarray]:
    pieces, material = [], []
    for fen in fens:
        board = chess.Board(fen)
        pieces.append(len(board.piece_map()))
        material.append(sum(VALUE[p.piece_type] * (1 if p.color == board.turn else -1)
                            for p in board.piece_map().values()))
    return np.array(pieces), np.array(material)


def row(name: str, fens, games, depth) -> str:
    pieces, material = spread(fens)
    p10, p90 = np.percentile(pieces, [10, 90])
    m10, m90 = np.percentile(material, [10, 90])
    d1 = f"{100 * np.mean(depth == 1):5.1f}%" if depth is not None else "    -"
    return (f"{name:<24} {len(fens):>7} {games:>7}   {pieces.mean():5.1f} ({p10:.0f}-{p90:.0f})   "
            f"{material.mean():+6.1f} ({m10:+.0f} to {m90:+.0f})   {d1}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", nargs="?", type=Path, default=DATA)
    p.add_argument("--human", action="store_true", help="also the human-game set")
    args = p.parse_args(argv)
    with np.load(args.data, allow_pickle=False) as d:
        a = {k: d[k] for k in ("fen", "n", "split", "game", "depth")}
        a["source"] = d["source"] if "source" in d.files else np.full(len(a["fen"]), b"greedy")
    print(f"{'split / source / N':<24} {'puzzles':>7} {'games':>7}   pieces (p10-p90)   material (p10 to p90)   depth 1")
    for s, split in enumerate(("train", "test")):
        for source in sorted(set(a["source"].tolist())):
            for n in sorted(set(a["n"].tolist())):
                m = (a["split"] == s) & (a["source"] == source) & (a["n"] == n)
                if m.any():
                    print(row(f"{split} {source.decode()} {n}", [f.decode() for f in a["fen"][m]],
                              len(set(a["game"][m].tolist())), a["depth"][m]))
    if args.human:
        task = Chess(args.data)
        for n in (1, 2, 3):
            pool = task.puzzles("human", n)
            print(row(f"human lichess {n}", list(pool.fen), -1, None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
