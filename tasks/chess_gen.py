"""Verified mate-in-N chess puzzles: an exhaustive mate search and a resumable generator.

A puzzle is a position where exactly one first move forces mate within N moves and no move mates
sooner (N is the smallest such number). Both facts are proved by `find_mate`, a full-width search
over every legal move of both sides (no heuristics that could hide a move; only cut-offs: a
defender reply that escapes refutes the attacker's move, and at the attacker's last move only
checking moves can mate). Candidate positions come from self-play games; each game gives at most
one puzzle per N (positions of one game are near-duplicates) and belongs to one split.

The shipped dataset, tasks/data/chess/puzzles.npz (190 kB, package data), is exactly what this command writes: 14 min
of one core's CPU time when measured (393 s for the 5000 train games, 428 s for the 350 test games;
`--workers 2` spreads the games over two processes, same output). Progress goes to stderr.

    OMP_NUM_THREADS=1 .venv/bin/python -m tasks.chess_gen --seed 0 --train-games 5000 --test-games 350 \
        --out tasks/data/chess/puzzles.npz

It holds 3585 mate-in-1 and 3024 mate-in-2 train puzzles (5000 games), and 263 / 202 / 201
test puzzles of mate in 1 / 2 / 3 (350 games); the npz's `meta` records the command and settings.

Game g of split s is played from np.random.default_rng([seed, s, g]) (s = 0 train, 1 test), so the
output does not depend on interruptions or on the number of workers. Each finished game is
appended to a log (`--log`, default `<cache dir>/chess_gen/<out name>.log.jsonl`, see
tasks/cache.py); running the command again resumes after the last logged game (a log written
with other settings is refused). The npz is (re)written from the log when all games are done.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import chess
import numpy as np

from .cache import cache_dir

FORMAT_VERSION = 1  # bumped when the search, the games or the record layout change what is generated
MAX_PLIES = 300  # self-play games stop here if not over earlier
MAX_HALFMOVE_CLOCK = 100  # positions closer to the 75-move draw are skipped (tokens drop the clock)
DEFAULT_MAX_NODES = 20_000  # search budget per position; a position over it is skipped, not guessed
VALUE = {chess.PAWN: 1, chess.KNIGHT: 3, chess.BISHOP: 3, chess.ROOK: 5, chess.QUEEN: 9, chess.KING: 0}
SPLITS = ("train", "test")


# ------------------------------------------------------------------------------------ mate search

def checking_moves(board: chess.Board) -> list[chess.Move]:
    """The legal moves of the side to move that give check (same set as filtering by gives_check).

    Only moves that can check are generated: a piece moving to a square from which its kind
    attacks the enemy king, moves of a piece standing alone between the king and one of our
    sliders (discovered checks), promotions, castling and en passant; the last three kinds are
    confirmed with gives_check. About 4x cheaper than testing every legal move.
    """
    us = board.turn
    king = board.king(not us)
    occupied = board.occupied
    ours = board.occupied_co[us]
    diag = chess.BB_DIAG_ATTACKS[king][chess.BB_DIAG_MASKS[king] & occupied]
    orth = (chess.BB_RANK_ATTACKS[king][chess.BB_RANK_MASKS[king] & occupied]
            | chess.BB_FILE_ATTACKS[king][chess.BB_FILE_MASKS[king] & occupied])
    direct = ((chess.PAWN, chess.BB_PAWN_ATTACKS[not us][king]), (chess.KNIGHT, chess.BB_KNIGHT_ATTACKS[king]),
              (chess.BISHOP, diag), (chess.ROOK, orth), (chess.QUEEN, diag | orth))
    out, seen = [], set()
    for piece_type, to_mask in direct:
        from_mask = board.pieces_mask(piece_type, us)
        if from_mask and to_mask:
            for move in board.generate_legal_moves(from_mask, to_mask):
                if move.promotion is None or board.gives_check(move):
                    out.append(move)
                    seen.add(move)
    maybe = board.pawns & ours & (chess.BB_RANK_7 if us == chess.WHITE else chess.BB_RANK_2)  # promotions
    for slider in chess.scan_forward((board.bishops | board.rooks | board.queens) & ours):
        if chess.BB_RAYS[king][slider]:
            between = chess.between(king, slider) & occupied
            if between and not between & (between - 1):  # exactly one piece in the way
                maybe |= between & ours
    candidates = []
    if maybe:
        candidates += board.generate_legal_moves(maybe, chess.BB_ALL)
    candidates += board.generate_castling_moves()
    if board.ep_square is not None:
        candidates += board.generate_legal_ep()
    for move in candidates:
        if move not in seen and board.gives_check(move):
            out.append(move)
            seen.add(move)
    return out


class SearchBudgetExceeded(Exception):
    """A search expanded more positions than its budget; the position is skipped, not labelled."""


class MateSearch:
    """Exhaustive forced-mate search for the side to move ("attacker") of the positions it is given.

    `n` counts the attacker's moves. Results are memoized per (position, n) and the last refutation
    found at each n is tried first (killer heuristic): both only change the order of work, never a
    result. `nodes` counts expanded positions; past `max_nodes` a SearchBudgetExceeded is raised.
    """

    def __init__(self, max_nodes: int | None = None):
        self.max_nodes = max_nodes
        self.nodes = 0
        self._memo: dict = {}
        self._killer: dict[int, chess.Move] = {}

    def _expand(self) -> None:
        self.nodes += 1
        if self.max_nodes is not None and self.nodes > self.max_nodes:
            raise SearchBudgetExceeded(f"more than {self.max_nodes} positions")

    def mates_within(self, board: chess.Board, n: int) -> bool:
        """The side to move forces checkmate within n of its moves."""
        if n == 1:  # only a check can mate
            for move in checking_moves(board):
                board.push(move)
                mate = not any(board.generate_legal_moves())
                board.pop()
                if mate:
                    return True
            return False
        key = (board._transposition_key(), n, True)
        if key in self._memo:
            return self._memo[key]
        self._expand()
        result = any(self.move_mates(board, move, n) for move in self._ordered(board))
        self._memo[key] = result
        return result

    def move_mates(self, board: chess.Board, move: chess.Move, n: int) -> bool:
        """Playing `move` forces mate within n moves (this one included)."""
        board.push(move)
        try:
            return self._defender_lost(board, n - 1)
        finally:
            board.pop()

    def _defender_lost(self, board: chess.Board, n: int) -> bool:
        """The defender, to move, is checkmated now or after any reply within n attacker moves."""
        if n == 0:
            return board.is_checkmate()
        key = (board._transposition_key(), n, False)
        if key in self._memo:
            return self._memo[key]
        self._expand()
        replies = list(board.generate_legal_moves())
        if not replies:
            result = board.is_check()  # checkmate already; stalemate is no win
        else:
            killer = self._killer.get(n)
            if killer in replies:
                replies.remove(killer)
                replies.insert(0, killer)
            result = True
            for reply in replies:
                board.push(reply)
                escaped = not self.mates_within(board, n)
                board.pop()
                if escaped:
                    self._killer[n] = reply
                    result = False
                    break
        self._memo[key] = result
        return result

    @staticmethod
    def _ordered(board: chess.Board) -> list[chess.Move]:
        """Checks, then captures, then quiet moves: mating lines are found early (all are tried)."""
        checks = checking_moves(board)
        seen = set(checks)
        captures, quiet = [], []
        for move in board.generate_legal_moves():
            if move not in seen:
                (captures if board.is_capture(move) else quiet).append(move)
        return checks + captures + quiet


def find_mate(board: chess.Board, max_n: int, *, max_nodes: int | None = None,
              limit: int = 2) -> tuple[int | None, list[chess.Move]]:
    """(N, keys): the smallest N <= max_n at which some first move forces mate, and such moves.

    At most `limit` keys are returned (2 is enough to tell a unique key); (None, []) when the
    side to move has no forced mate within max_n. Raises SearchBudgetExceeded past `max_nodes`.
    """
    search = MateSearch(max_nodes)
    moves = list(board.generate_legal_moves())
    for n in range(1, max_n + 1):
        candidates = checking_moves(board) if n == 1 else moves
        keys = []
        for move in candidates:
            if search.move_mates(board, move, n):
                keys.append(move)
                if len(keys) == limit:
                    break
        if keys:
            return n, keys
    return None, []


# ------------------------------------------------------------ second difficulty axis: search depth

MATE_SCORE = 100_000


def _evaluate(board: chess.Board, moves: list[chess.Move]) -> int:
    """Static score for the side to move: 10 x material (P=1 .. Q=9) plus its number of legal moves.

    The mobility term makes a move that boxes the enemy king in look good before the mate is
    within the horizon, as an engine's evaluation does.
    """
    score = len(moves)
    for piece_type, value in VALUE.items():
        if value:
            score += 10 * value * (len(board.pieces(piece_type, board.turn))
                                   - len(board.pieces(piece_type, not board.turn)))
    return score


def _negamax(board: chess.Board, depth: int, alpha: int, beta: int) -> int:
    """Fail-soft alpha-beta value for the side to move; mates are scored by their distance."""
    moves = list(board.generate_legal_moves())
    if not moves:
        return -MATE_SCORE - depth if board.is_check() else 0  # mated sooner (more depth left) is worse
    if depth == 0:
        return _evaluate(board, moves)
    moves.sort(key=lambda m: not board.is_capture(m))
    best = -2 * MATE_SCORE
    for move in moves:
        board.push(move)
        value = -_negamax(board, depth - 1, -beta, -alpha)
        board.pop()
        if value > best:
            best = value
            if value > alpha:
                alpha = value
                if alpha >= beta:
                    break
    return best


def ranks_first(board: chess.Board, depth: int, move: chess.Move) -> bool:
    """`move` scores strictly higher than every other move in a depth-`depth` `_negamax` search."""
    board.push(move)
    v_move = -_negamax(board, depth - 1, -2 * MATE_SCORE, 2 * MATE_SCORE)
    board.pop()
    for other in board.generate_legal_moves():
        if other != move:  # null window: does `other` reach v_move?
            board.push(other)
            value = -_negamax(board, depth - 1, -v_move, -v_move + 1)
            board.pop()
            if value >= v_move:
                return False
    return True


def key_depth(board: chess.Board, key: chess.Move, n: int) -> int:
    """The smallest search depth d (plies) at which `_negamax` ranks the mate-in-n `key` strictly first.

    `_negamax` is full-width alpha-beta with a material + mobility evaluation and exact mate
    scores. It sees a mate in n at d = 2n - 1, where only the key mates, so 1 <= d <= 2n - 1 and
    that last depth is not searched; smaller d: the key already looks best to a shallower search.
    The second difficulty axis of the dataset.
    """
    for depth in range(1, 2 * n - 1):
        if ranks_first(board, depth, key):
            return depth
    return 2 * n - 1


# ------------------------------------------------------------------------------ candidate games

def _greedy_move(board: chess.Board, rng: np.random.Generator) -> chess.Move:
    """A mate in one if there is one, else a capture of the most material, ties broken at random."""
    best, best_score = [], -1
    for move in board.generate_legal_moves():
        score = 0
        if board.is_capture(move):
            victim = board.piece_type_at(move.to_square)
            score = VALUE[victim] if victim else VALUE[chess.PAWN]  # None: en passant
        if move.promotion:
            score += VALUE[move.promotion] - VALUE[chess.PAWN]
        if board.gives_check(move):
            board.push(move)
            if board.is_checkmate():
                score = 100
            board.pop()
        if score > best_score:
            best, best_score = [move], score
        elif score == best_score:
            best.append(move)
    return best[rng.integers(len(best))]


POLICIES = ("greedy", "random")


def play_game(rng: np.random.Generator, policy: str = "greedy") -> list[chess.Board]:
    """The positions (before each move) of one self-play game of at most MAX_PLIES plies.

    "random": both sides play uniformly random legal moves. "greedy": one side, drawn at random,
    plays `_greedy_move` against a random side; lopsided material makes mates frequent.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    greedy_color = bool(rng.integers(2))
    board = chess.Board()
    positions = []
    while not board.is_game_over() and board.ply() < MAX_PLIES:
        positions.append(board.copy(stack=False))
        if policy == "greedy" and board.turn == greedy_color:
            move = _greedy_move(board, rng)
        else:
            moves = list(board.generate_legal_moves())
            move = moves[rng.integers(len(moves))]
        board.push(move)
    return positions


@dataclass(frozen=True)
class Puzzle:
    fen: str  # the position, side to move = the attacker
    key: str  # the unique key move, UCI
    n: int  # mate in n: the key forces mate within n moves, nothing mates sooner
    depth: int  # key_depth: plies a material alpha-beta search needs to rank the key first
    game: int  # index of the game in its split
    ply: int  # the position's ply in that game


def puzzles_from_game(positions: list[chess.Board], game: int, max_n: int,
                      max_nodes: int | None = DEFAULT_MAX_NODES) -> tuple[list[Puzzle], dict]:
    """At most one puzzle per N <= max_n from one game, scanning from its last position backwards.

    Positions are skipped when their key is not unique, is an under-promotion (the task's output
    has no promotion piece: a pawn reaching the last rank becomes a queen), their halfmove clock is
    near the 75-move draw, or their search exceeds `max_nodes`. Returns the puzzles and counts.
    """
    wanted = set(range(1, max_n + 1))
    found, stats = [], {"searched": 0, "over_budget": 0}
    for ply in range(len(positions) - 1, -1, -1):
        if not wanted:
            break
        board = positions[ply]
        if board.halfmove_clock > MAX_HALFMOVE_CLOCK:
            continue
        stats["searched"] += 1
        try:
            n, keys = find_mate(board, max(wanted), max_nodes=max_nodes)
        except SearchBudgetExceeded:
            stats["over_budget"] += 1
            continue
        if n in wanted and len(keys) == 1 and keys[0].promotion in (None, chess.QUEEN):
            wanted.discard(n)
            found.append(Puzzle(board.fen(), keys[0].uci(), n, key_depth(board, keys[0], n), game, ply))
    return sorted(found, key=lambda p: p.n), stats


# ------------------------------------------------------------------------------------- generator

@dataclass(frozen=True)
class GenConfig:
    seed: int = 0
    train_games: int = 5000
    test_games: int = 350
    train_max_n: int = 2  # the default training split is mate in 1 and 2
    test_max_n: int = 3
    policy: str = "greedy"
    max_nodes: int = DEFAULT_MAX_NODES
    version: int = FORMAT_VERSION

    def games(self, split: str) -> int:
        return self.train_games if split == "train" else self.test_games

    def max_n(self, split: str) -> int:
        return self.train_max_n if split == "train" else self.test_max_n


def run_game(cfg: GenConfig, split: str, game: int) -> dict:
    """One game's log record: its puzzles, search counts, and the CPU seconds it took."""
    t_cpu = time.process_time()
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), game])
    positions = play_game(rng, cfg.policy)
    puzzles, stats = puzzles_from_game(positions, game, cfg.max_n(split), cfg.max_nodes)
    return {"split": split, "game": game, "plies": len(positions), **stats,
            "cpu_s": round(time.process_time() - t_cpu, 4), "puzzles": [asdict(p) for p in puzzles]}


def _run_game_args(args: tuple) -> dict:
    return run_game(*args)


class GeneratorError(Exception):
    """A log that belongs to other settings, or cannot be read; one-line message."""


def read_log(path: Path, cfg: GenConfig) -> list[dict]:
    """The game records of a log written with `cfg` (a torn last line, from a kill, is dropped)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    if not lines:
        return []
    try:
        header = json.loads(lines[0])["config"]
    except (ValueError, KeyError, TypeError):
        raise GeneratorError(f"{path} is not a chess generator log; move it away or pass another --log") from None
    fixed = {k: v for k, v in asdict(cfg).items() if k not in ("train_games", "test_games")}
    for key, value in fixed.items():
        if header.get(key) != value:
            raise GeneratorError(f"{path} was written with {key}={header.get(key)!r}, not {value!r}; "
                                 "resume with the same settings or pass another --log")
    records = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i != len(lines):
                raise GeneratorError(f"{path} line {i} is damaged") from None
    return records


def canonical(fen: str) -> str:
    """The position as the task's tokens see it: side to move as white, clocks dropped."""
    board = chess.Board(fen)
    return (board if board.turn == chess.WHITE else board.mirror()).epd()


def pack(records: list[dict], cfg: GenConfig) -> dict[str, np.ndarray]:
    """The dataset arrays from game records, in (split, game, n) order.

    A position (as tokens see it) is kept once per split, and a train puzzle whose position is
    also a test puzzle is dropped, so the splits share neither games nor positions.
    """
    rows = sorted(((SPLITS.index(r["split"]), p["game"], p["n"], p) for r in records for p in r["puzzles"]),
                  key=lambda row: row[:3])
    test_positions = {canonical(p["fen"]) for s, _, _, p in rows if s == 1}
    kept, seen = [], set()
    for s, _, _, p in rows:
        pos = canonical(p["fen"])
        if (s, pos) in seen or (s == 0 and pos in test_positions):
            continue
        seen.add((s, pos))
        kept.append((s, p))
    meta = {"config": asdict(cfg), "command": "python -m tasks.chess_gen " + " ".join(cli_args(cfg))}
    return {
        "fen": np.array([p["fen"] for _, p in kept], dtype="S100"),
        "key": np.array([p["key"] for _, p in kept], dtype="S5"),
        "n": np.array([p["n"] for _, p in kept], dtype=np.int8),
        "depth": np.array([p["depth"] for _, p in kept], dtype=np.int8),
        "game": np.array([p["game"] for _, p in kept], dtype=np.int32),
        "ply": np.array([p["ply"] for _, p in kept], dtype=np.int16),
        "split": np.array([s for s, _ in kept], dtype=np.int8),  # 0 train, 1 test
        "meta": np.array(json.dumps(meta, sort_keys=True)),
    }


def cli_args(cfg: GenConfig) -> list[str]:
    defaults = GenConfig()
    return [f"--{k.replace('_', '-')}={v}" for k, v in asdict(cfg).items()
            if k != "version" and (k in ("seed", "train_games", "test_games") or v != getattr(defaults, k))]


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; this is a dataset to share
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def generate(cfg: GenConfig, out: Path, log: Path, *, workers: int = 1, progress: bool = True) -> dict:
    """Play and search the games the log lacks, appending each to it; then write `out`. Returns counts."""
    records = read_log(log, cfg)
    done = {(r["split"], r["game"]) for r in records}
    todo = [(cfg, split, g) for split in SPLITS for g in range(cfg.games(split)) if (split, g) not in done]
    if not log.exists() or not log.read_text().strip():
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps({"config": asdict(cfg)}) + "\n")
    else:  # drop a torn last line before appending
        log.write_text("\n".join(log.read_text().splitlines()[:1] + [json.dumps(r) for r in records]) + "\n")
    counts = _counts(records)
    bar = _Progress(len(done), len(done) + len(todo), counts) if progress else None
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 and todo else None
    try:
        results = pool.imap(_run_game_args, todo) if pool else map(_run_game_args, todo)
        with open(log, "a") as fh:
            for record in results:  # in order, so the log is always a prefix of the full run
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                records.append(record)
                _count(counts, record)
                if bar:
                    bar.update(record["cpu_s"])
    finally:
        if pool:
            pool.terminate()
    arrays = pack([r for r in records if r["game"] < cfg.games(r["split"])], cfg)  # a log may hold more
    write_npz(out, arrays)
    return {"games": len(records), "cpu_s": sum(r["cpu_s"] for r in records), "found": counts,
            "kept": {split: {int(n): int(((arrays["split"] == s) & (arrays["n"] == n)).sum())
                             for n in np.unique(arrays["n"])} for s, split in enumerate(SPLITS)}}


def _count(counts: dict[str, dict[int, int]], record: dict) -> None:
    for p in record["puzzles"]:
        counts[record["split"]][p["n"]] = counts[record["split"]].get(p["n"], 0) + 1


def _counts(records: list[dict]) -> dict[str, dict[int, int]]:
    counts = {split: {} for split in SPLITS}
    for r in records:
        _count(counts, r)
    return counts


class _Progress:
    """One line per ~2% of the games (a log file stays readable): games done, puzzles per N, rate."""

    def __init__(self, done: int, total: int, counts: dict):
        self.done, self.total, self.counts = done, total, counts
        self.start, self.cpu, self.every = time.time(), 0.0, max(1, total // 50)

    def update(self, cpu_s: float) -> None:
        self.done += 1
        self.cpu += cpu_s
        if self.done % self.every == 0 or self.done == self.total:
            found = "  ".join(f"{s} " + ",".join(f"N{n}:{c}" for n, c in sorted(self.counts[s].items()))
                              for s in SPLITS)
            print(f"games {self.done}/{self.total}  {found}  ({time.time() - self.start:.0f} s wall, "
                  f"{self.cpu:.0f} s CPU this run)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.chess_gen", description=__doc__.split("\n")[0])
    defaults = GenConfig()
    for name, value in asdict(defaults).items():
        if name != "version":
            p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                           **({"choices": POLICIES} if name == "policy" else {}))
    # the current directory, never the installed package (the shipped file: --out tasks/data/chess/puzzles.npz)
    p.add_argument("--out", type=Path, default=Path("puzzles.npz"), help="output .npz (default: ./puzzles.npz)")
    p.add_argument("--log", type=Path, help="resume log (default: <cache dir>/chess_gen/<out name>.log.jsonl)")
    p.add_argument("--workers", type=int, default=1, help="processes (the output does not depend on it)")
    args = p.parse_args(argv)
    cfg = GenConfig(**{k: getattr(args, k) for k in asdict(defaults) if k != "version"})
    log = args.log or cache_dir() / "chess_gen" / (args.out.name + ".log.jsonl")
    try:
        summary = generate(cfg, args.out, log, workers=max(1, args.workers))
    except GeneratorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume from {log}", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
