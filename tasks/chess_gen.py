"""Verified mate-in-N chess puzzles: an exhaustive mate search and a resumable generator.

A puzzle is a position where exactly one first move forces mate within N moves and no move mates
sooner (N is the smallest such number). Both facts are proved by `find_mate`, a full-width search
over every legal move of both sides (no heuristics that could hide a move; only cut-offs: a
defender reply that escapes refutes the attacker's move, and at the attacker's last move only
checking moves can mate). Candidate positions come from self-play games; each game gives at most
one puzzle per N (positions of one game are near-duplicates) and belongs to one split.

Candidate games come from two sources (`--policy`): "greedy" (one side captures greedily and
mates in one when it can, the other plays random moves: lopsided material, many mates, cheap) and
"engine" (Stockfish against itself from a random opening, each move drawn from its four best at
depth 3: positions that look like play; `--prefilter` lets a Stockfish search choose which
positions to prove, see `puzzles_from_game`). Stockfish is a system package (Debian/Ubuntu:
`apt-get install stockfish`); only the engine source and `--prefilter` need it.

The shipped dataset, tasks/data/chess/puzzles.npz (1.7 MB, package data), is exactly what these
commands write (`--workers 2` spreads the games over two processes, same output; progress goes
to stderr):

    python -m tasks.chess_gen --seed 0 --train-games 40000 --test-games 0 --out greedy_train.npz
    python -m tasks.chess_gen --seed 0 --prefilter --train-games 0 --test-games 1500 --out greedy_test.npz
    python -m tasks.chess_gen --seed 1 --policy engine --prefilter --train-games 7000 --test-games 2000 \
        --out engine.npz
    python -m tasks.chess_gen merge --out tasks/data/chess/puzzles.npz greedy_train.npz greedy_test.npz engine.npz

Measured on the 2-core machine (2026-12-01; CPU seconds of the generator and its Stockfish,
which are not wall seconds: several jobs shared the cores), verified puzzles per CPU-minute:

    source, split (max N)      games   CPU s   mate in 1   mate in 2   mate in 3
    greedy, train (2)          40000    2831       604         522          -
    greedy + prefilter, test (3) 1500    358       181         122         56
    engine + prefilter, train (2) 7000   858       344         220          -
    engine + prefilter, test (3)  2000   873        97          69         37

After `merge` (a position once per split; a train position that is also a test position is
dropped): train 33,392 mate-in-1 and 27,762 mate-in-2 puzzles (of them 4,912 and 3,148 from engine
games); test 2,483 / 1,737 / 866 of mate in 1 / 2 / 3 (1,406 / 1,009 / 533 from engine games).
`bench/chess_dataset.py` prints the piece-count and material spread of each part: greedy puzzles
have the mover about 28 points of material ahead, engine ones about 10, human ones (split
"human" of tasks.chess) 3 behind. Each npz's `meta` records its commands and settings.

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
import shutil
import subprocess
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


POLICIES = ("greedy", "random", "engine")


def play_game(rng: np.random.Generator, policy: str = "greedy",
              engine: Stockfish | None = None) -> list[chess.Board]:
    """The positions (before each move) of one self-play game of at most MAX_PLIES plies.

    "random": both sides play uniformly random legal moves. "greedy": one side, drawn at random,
    plays `_greedy_move` against a random side; lopsided material makes mates frequent.
    "engine": Stockfish against itself (`_engine_game`); needs `engine`.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    if policy == "engine":
        if engine is None:
            raise ValueError("the engine policy needs a Stockfish instance")
        return _engine_game(rng, engine)
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


# ------------------------------------------------------------------ engine games (Stockfish, UCI)

# Settings of the "engine" source; changing one changes the games, so it bumps FORMAT_VERSION.
ENGINE_DEPTH = 3  # plies Stockfish searches for each game move
ENGINE_MULTIPV = 4  # moves it scores; the game move is drawn from these
ENGINE_TEMPERATURE = 100.0  # centipawns; each side's own temperature is this times U(0.25, 2)
OPENING_PLIES = (2, 8)  # uniformly random legal moves first (inclusive range), so games differ
# Plies of the Stockfish search that picks the positions worth a proof, for mates within N:
# 2N + 2. On 20 engine games it flagged every mate in 1 and 2 that a depth-8 search did, and
# 83% of the mates in 3, at 0.7 ms a position against 3.2 ms at depth 8.
def prefilter_depth(max_n: int) -> int:
    return 2 * max_n + 2
MATE_CP = 100_000  # a mate in k scores MATE_CP - 100 k centipawns (sooner is better)


class EngineError(Exception):
    """Stockfish is missing or stopped answering; one-line message."""


def stockfish_path() -> str:
    """$DEQLOOP_STOCKFISH, else `stockfish` on PATH, else Debian's /usr/games/stockfish."""
    path = os.environ.get("DEQLOOP_STOCKFISH") or shutil.which("stockfish")
    if path is None and os.access("/usr/games/stockfish", os.X_OK):
        path = "/usr/games/stockfish"
    if path is None:
        raise EngineError("the engine source needs Stockfish: install it (Debian/Ubuntu: apt-get install "
                          "stockfish) or point DEQLOOP_STOCKFISH at the binary")
    return path


class Stockfish:
    """One Stockfish process spoken to over UCI through pipes: fixed-depth multi-PV analysis.

    Deterministic: one search thread, and `new_game` clears the hash and history tables, so a game
    played after `new_game` does not depend on what the process searched before. Raw UCI instead of
    python-chess's `chess.engine`: measured side by side on the same 80 positions x 3 (depth 3,
    multi-PV 4, the game moves' search, with the cores shared), 18.0 ms a call through
    chess.engine against 7.3 ms here (2.5x), and game moves are most of a game's time.
    """

    def __init__(self, path: str | None = None):
        self.path = path or stockfish_path()
        try:
            self._proc = subprocess.Popen([self.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.DEVNULL, text=True, bufsize=1)
        except OSError as e:
            raise EngineError(f"cannot start Stockfish at {self.path}: {e.strerror}") from None
        self._send("uci")
        self._until("uciok")
        self._send("setoption name Threads value 1")
        self._send("setoption name Hash value 16")
        self._multipv = None
        self.new_game()

    def _send(self, line: str) -> None:
        try:
            self._proc.stdin.write(line + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise EngineError(f"Stockfish at {self.path} stopped (exit code {self._proc.poll()})") from None

    def _until(self, token: str) -> list[str]:
        lines = []
        while True:
            line = self._proc.stdout.readline()
            if not line:
                raise EngineError(f"Stockfish at {self.path} stopped (exit code {self._proc.poll()})")
            lines.append(line)
            if line.startswith(token):
                return lines

    def new_game(self) -> None:
        self._send("ucinewgame")
        self._send("isready")
        self._until("readyok")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the engine process so far (Linux /proc; 0.0 elsewhere)."""
        try:
            fields = Path(f"/proc/{self._proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return 0.0

    def analyse(self, board: chess.Board, depth: int, multipv: int = 1) -> list[tuple[chess.Move, int, int | None]]:
        """The engine's best `multipv` moves, best first: (move, centipawns, mate) for the side to move.

        `mate` is k when the move mates in k moves, -k when the mover is mated in k, else None;
        centipawns of a mate are +-(MATE_CP - 100 |k|). Empty when the game is over.
        """
        if multipv != self._multipv:
            self._send(f"setoption name MultiPV value {multipv}")
            self._multipv = multipv
        self._send(f"position fen {board.fen()}")
        self._send(f"go depth {depth}")
        lines = {}
        for line in self._until("bestmove"):
            words = line.split()
            if words[0] != "info" or "pv" not in words or "score" not in words:
                continue
            rank = int(words[words.index("multipv") + 1]) if "multipv" in words else 1
            i = words.index("score")
            kind, value = words[i + 1], int(words[i + 2])
            mate = value if kind == "mate" else None
            cp = value if mate is None else (MATE_CP - 100 * abs(mate)) * (1 if mate > 0 else -1)
            lines[rank] = (chess.Move.from_uci(words[words.index("pv") + 1]), cp, mate)
        return [lines[rank] for rank in sorted(lines)]

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._send("quit")
                self._proc.wait(timeout=5)
            except (EngineError, subprocess.TimeoutExpired):
                self._proc.kill()

    def __enter__(self) -> Stockfish:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _engine_game(rng: np.random.Generator, engine: Stockfish) -> list[chess.Board]:
    """Stockfish against itself from a random opening; each move drawn from its top moves.

    After OPENING_PLIES random legal moves, each side picks among Stockfish's ENGINE_MULTIPV best
    moves at ENGINE_DEPTH with probability proportional to exp(score / T), T its own temperature
    (drawn per game, so one side is often the stronger); the errors this makes decide most games
    by mate, and positions look like play, not like random moves.
    """
    engine.new_game()
    opening = int(rng.integers(OPENING_PLIES[0], OPENING_PLIES[1] + 1))
    temperature = ENGINE_TEMPERATURE * rng.uniform(0.25, 2.0, size=2)  # [black, white]
    board = chess.Board()
    positions = []
    while not board.is_game_over() and board.ply() < MAX_PLIES:
        positions.append(board.copy(stack=False))
        if board.ply() < opening:
            moves = list(board.generate_legal_moves())
            move = moves[rng.integers(len(moves))]
        else:
            lines = engine.analyse(board, ENGINE_DEPTH, ENGINE_MULTIPV)
            scores = np.array([cp for _, cp, _ in lines], dtype=np.float64)
            p = np.exp((scores - scores.max()) / temperature[int(board.turn)])
            move = lines[rng.choice(len(lines), p=p / p.sum())][0]
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
                      max_nodes: int | None = DEFAULT_MAX_NODES,
                      prefilter: Stockfish | None = None) -> tuple[list[Puzzle], dict]:
    """At most one puzzle per N <= max_n from one game, scanning from its last position backwards.

    Positions are skipped when their key is not unique, is an under-promotion (the task's output
    has no promotion piece: a pawn reaching the last rank becomes a queen), their halfmove clock is
    near the 75-move draw, or their search exceeds `max_nodes`. With `prefilter`, a Stockfish
    search of prefilter_depth(max_n) plies first picks the positions where it sees a mate within the N
    still wanted, and only those are searched exhaustively: the engine decides which positions
    are proved, never a label (a mate it misses costs a candidate, not a wrong puzzle).
    Returns the puzzles and counts.
    """
    wanted = set(range(1, max_n + 1))
    found, stats = [], {"searched": 0, "over_budget": 0}
    if prefilter is not None:
        stats["prefiltered"] = 0
    for ply in range(len(positions) - 1, -1, -1):
        if not wanted:
            break
        board = positions[ply]
        if board.halfmove_clock > MAX_HALFMOVE_CLOCK:
            continue
        if prefilter is not None:
            stats["prefiltered"] += 1
            lines = prefilter.analyse(board, prefilter_depth(max_n))
            if not lines or lines[0][2] is None or not 0 < lines[0][2] <= max(wanted):
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
    prefilter: bool = False  # Stockfish picks the positions to prove (puzzles_from_game)
    version: int = FORMAT_VERSION

    def games(self, split: str) -> int:
        return self.train_games if split == "train" else self.test_games

    def max_n(self, split: str) -> int:
        return self.train_max_n if split == "train" else self.test_max_n


_ENGINE: Stockfish | None = None  # this process's Stockfish, started at its first engine game


def _engine() -> Stockfish:
    global _ENGINE
    path = stockfish_path()
    if _ENGINE is None or _ENGINE._proc.poll() is not None or _ENGINE.path != path:
        if _ENGINE is not None:
            _ENGINE.close()
        _ENGINE = Stockfish(path)
    return _ENGINE


def run_game(cfg: GenConfig, split: str, game: int) -> dict:
    """One game's log record: its puzzles, search counts, and the CPU seconds it took.

    `cpu_s` counts this process and, for games that use Stockfish, the engine's process too.
    """
    needs_engine = cfg.policy == "engine" or cfg.prefilter
    engine = _engine() if needs_engine else None
    t_cpu, t_engine = time.process_time(), engine.cpu_seconds() if engine else 0.0
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split), game])
    positions = play_game(rng, cfg.policy, engine)
    puzzles, stats = puzzles_from_game(positions, game, cfg.max_n(split), cfg.max_nodes,
                                       engine if cfg.prefilter else None)
    cpu = time.process_time() - t_cpu + (engine.cpu_seconds() - t_engine if engine else 0.0)
    return {"split": split, "game": game, "plies": len(positions), **stats,
            "cpu_s": round(cpu, 4), "puzzles": [asdict(p) for p in puzzles]}


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
    defaults = asdict(GenConfig())
    for key, value in fixed.items():  # a field newer than the log: the log ran with its default
        if header.get(key, defaults[key]) != value:
            raise GeneratorError(f"{path} was written with {key}={header.get(key, defaults[key])!r}, not {value!r}; "
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


# The dataset's arrays and their types: one row per puzzle (split 0 train, 1 test; source: the games' policy).
DTYPES = {"fen": "S100", "key": "S5", "n": np.int8, "depth": np.int8, "game": np.int32, "ply": np.int16,
          "split": np.int8, "source": "S8"}


def _split_rules(rows: list[dict]) -> dict[str, np.ndarray]:
    """The arrays of `rows` (dicts of DTYPES' fields, str fen and source) in (split, game, source, n)
    order, a position (as tokens see it) kept once per split, and no train puzzle whose position is
    also a test puzzle: the splits share neither games nor positions."""
    rows = sorted(rows, key=lambda r: (r["split"], r["game"], r["source"], r["n"]))
    test_positions = {canonical(r["fen"]) for r in rows if r["split"] == 1}
    kept, seen = [], set()
    for r in rows:
        pos = canonical(r["fen"])
        if (r["split"], pos) in seen or (r["split"] == 0 and pos in test_positions):
            continue
        seen.add((r["split"], pos))
        kept.append(r)
    return {k: np.array([r[k] for r in kept], dtype=dtype) for k, dtype in DTYPES.items()}


def pack(records: list[dict], cfg: GenConfig) -> dict[str, np.ndarray]:
    """The dataset arrays from one run's game records (see `_split_rules`), with its meta."""
    rows = [{**{k: p[k] for k in ("fen", "key", "n", "depth", "game", "ply")},
             "split": SPLITS.index(r["split"]), "source": cfg.policy} for r in records for p in r["puzzles"]]
    meta = {"config": asdict(cfg), "command": "python -m tasks.chess_gen " + " ".join(cli_args(cfg))}
    return {**_split_rules(rows), "meta": np.array(json.dumps(meta, sort_keys=True))}


def merge(parts: list[dict[str, np.ndarray]], commands: list[str]) -> dict[str, np.ndarray]:
    """One dataset from several generator outputs (e.g. one per policy), under `pack`'s split rules.

    Ordered by (split, game, source, n), so the first puzzles of a test pool mix the sources.
    Games of different sources are different games (`source` tells them apart; a part without
    it is from before the engine source: greedy). `meta` keeps each part's meta and the command.
    """
    rows = []
    for part in parts:
        sources = part["source"] if "source" in part else np.full(len(part["fen"]), b"greedy")
        for i in range(len(part["fen"])):
            row = {k: part[k][i].item() for k in DTYPES if k != "source"}
            rows.append({**row, "fen": row["fen"].decode(), "key": row["key"].decode(),
                         "source": sources[i].decode()})
    meta = {"parts": [json.loads(str(part["meta"])) for part in parts],
            "command": "python -m tasks.chess_gen merge " + " ".join(commands)}
    return {**_split_rules(rows), "meta": np.array(json.dumps(meta, sort_keys=True))}


def cli_args(cfg: GenConfig) -> list[str]:
    defaults = GenConfig()
    return [f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f"={v}") for k, v in asdict(cfg).items()
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
        if name == "prefilter":
            p.add_argument("--prefilter", action="store_true",
                           help="Stockfish picks the positions to prove (much faster; labels are still proved)")
        elif name != "version":
            p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                           **({"choices": POLICIES} if name == "policy" else {}))
    # the current directory, never the installed package (the shipped file: --out tasks/data/chess/puzzles.npz)
    p.add_argument("--out", type=Path, default=Path("puzzles.npz"), help="output .npz (default: ./puzzles.npz)")
    p.add_argument("--log", type=Path, help="resume log (default: <cache dir>/chess_gen/<out name>.log.jsonl)")
    p.add_argument("--workers", type=int, default=1, help="processes (the output does not depend on it)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    args = p.parse_args(argv)
    cfg = GenConfig(**{k: getattr(args, k) for k in asdict(defaults) if k != "version"})
    log = args.log or cache_dir() / "chess_gen" / (args.out.name + ".log.jsonl")
    try:
        summary = generate(cfg, args.out, log, workers=max(1, args.workers))
    except (GeneratorError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; run the same command again to resume from {log}", file=sys.stderr)
        return 130
    print(json.dumps(summary))
    print(f"wrote {args.out}")
    return 0


def merge_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.chess_gen merge",
                                description="one dataset from several generator outputs (see `merge`)")
    p.add_argument("--out", type=Path, required=True, help="output .npz")
    p.add_argument("parts", type=Path, nargs="+", help="generator outputs (.npz)")
    args = p.parse_args(argv)
    parts = []
    for path in args.parts:
        try:
            with np.load(path, allow_pickle=False) as data:
                parts.append({k: data[k] for k in data.files})
        except (OSError, ValueError) as e:
            print(f"error: cannot read {path} ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        missing = [k for k in (*DTYPES, "meta") if k not in parts[-1] and k != "source"]
        if missing:
            print(f"error: {path} is not a chess_gen output (no {', '.join(missing)})", file=sys.stderr)
            return 2
    arrays = merge(parts, [f"--out {args.out}"] + [str(p) for p in args.parts])
    write_npz(args.out, arrays)
    counts = {split: {int(n): int(((arrays["split"] == s) & (arrays["n"] == n)).sum()) for n in np.unique(arrays["n"])}
              for s, split in enumerate(SPLITS)}
    print(json.dumps({"kept": counts}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
