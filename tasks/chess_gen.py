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

The shipped dataset, tasks/data/chess/puzzles.npz (3.6 MB, package data), is exactly what these
commands write (`--workers 2` spreads the games over two processes, same output; progress goes
to stderr). The first four made the set of 2026-12-01; the next three extend the same seeds
with later games (`--first-game`: games first_game .. N-1, so no game is played twice and game
numbers stay unique per source), and the last merge adds them:

    python -m tasks.chess_gen --seed 0 --train-games 40000 --test-games 0 --out greedy_train.npz
    python -m tasks.chess_gen --seed 0 --prefilter --train-games 0 --test-games 1500 --out greedy_test.npz
    python -m tasks.chess_gen --seed 1 --policy engine --prefilter --train-games 7000 --test-games 2000 \
        --out engine.npz
    python -m tasks.chess_gen merge --out puzzles_v1.npz greedy_train.npz greedy_test.npz engine.npz
    python -m tasks.chess_gen --seed 0 --first-game 40000 --train-games 90000 --test-games 0 --out greedy_train2.npz
    python -m tasks.chess_gen --seed 0 --prefilter --first-game 1500 --train-games 0 --test-games 2500 \
        --out greedy_test2.npz
    python -m tasks.chess_gen --seed 1 --policy engine --prefilter --first-game 7000 --train-games 14000 \
        --test-games 0 --out engine2.npz
    python -m tasks.chess_gen merge --out tasks/data/chess/puzzles.npz puzzles_v1.npz greedy_train2.npz \
        greedy_test2.npz engine2.npz

Measured on the 2-core machine (CPU seconds of the generator and its Stockfish, which are not
wall seconds; 2026-12-01: several jobs shared the cores; 2026-12-02: two workers, alone),
verified puzzles per CPU-minute:

    source, split (max N), games        games   CPU s   mate in 1   mate in 2   mate in 3
    greedy, train (2), 0-39999          40000    2831       604         522          -
    greedy + prefilter, test (3), 0-1499 1500     358       181         122         56
    engine + prefilter, train (2), 0-6999 7000    858       344         220          -
    engine + prefilter, test (3), 0-1999 2000     873        97          69         37
    greedy, train (2), 40000-89999      50000    3558       598         522          -
    greedy + prefilter, test (3), 1500-2499 1000  242       167         126         56
    engine + prefilter, train (2), 7000-13999 7000 802      367         238          -

(The 50,000 greedy games took 32 min of wall time on two workers; all three extensions 41 min.)
After `merge` (a position once per split; a train position that is also a test position is
dropped): train 73,680 mate-in-1 and 61,859 mate-in-2 puzzles (of them 9,820 and 6,328 from engine
games); test 3,156 / 2,247 / 1,092 of mate in 1 / 2 / 3 (1,406 / 1,009 / 533 from engine games).
Every puzzle is from its own game (at most one per game, N and source). `bench/chess_dataset.py`
prints the piece-count and material spread of each part: greedy puzzles have the mover about 28
points of material ahead (p10-p90 +16 to +38), engine ones about 10 (+0 to +19), human ones
(split "human" of tasks.chess) 3 behind (-7 to 0); pieces on the board 14-16 on average in
generated puzzles, 18-20 in human ones. Each npz's `meta` records its commands and settings.

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
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import chess
import numpy as np

from .cache import cache_dir, write_npz
from .chess_mate import VALUE, SearchBudgetExceeded, checking_moves, find_mate, key_depth, ranks_first  # noqa: F401
from .stockfish import EngineError, Stockfish, engine_game, prefilter_depth, stockfish_path  # noqa: F401

FORMAT_VERSION = 1  # bumped when the search, the games or the record layout change what is generated
MAX_PLIES = 300  # self-play games stop here if not over earlier
MAX_HALFMOVE_CLOCK = 100  # positions closer to the 75-move draw are skipped (tokens drop the clock)
DEFAULT_MAX_NODES = 20_000  # search budget per position; a position over it is skipped, not guessed
SPLITS = ("train", "test")


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
    "engine": Stockfish against itself (tasks.stockfish.engine_game); needs `engine`.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {policy!r}")
    if policy == "engine":
        if engine is None:
            raise ValueError("the engine policy needs a Stockfish instance")
        return engine_game(rng, engine, MAX_PLIES)
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
    first_game: int = 0  # games first_game .. train_games-1 (test_games-1): extends an earlier run of the seed
    version: int = FORMAT_VERSION

    def games(self, split: str) -> int:
        return self.train_games if split == "train" else self.test_games

    def game_ids(self, split: str) -> range:
        return range(self.first_game, self.games(split))  # empty when first_game >= the games

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
    it is from before the engine source: greedy). `meta` keeps each generator run's meta (those
    of a part that is itself a merge, flat), the command, and the earlier merges' commands.
    """
    rows = []
    for part in parts:
        sources = part["source"] if "source" in part else np.full(len(part["fen"]), b"greedy")
        for i in range(len(part["fen"])):
            row = {k: part[k][i].item() for k in DTYPES if k != "source"}
            rows.append({**row, "fen": row["fen"].decode(), "key": row["key"].decode(),
                         "source": sources[i].decode()})
    metas, merges = [], []
    for part in parts:  # a part that is itself a merge contributes its runs, flat, in order
        meta = json.loads(str(part["meta"]))
        if "parts" in meta:
            metas.extend(meta["parts"])
            merges.extend(meta.get("merges", []) + [meta["command"]])
        else:
            metas.append(meta)
    meta = {"parts": metas, "command": "python -m tasks.chess_gen merge " + " ".join(commands),
            **({"merges": merges} if merges else {})}
    return {**_split_rules(rows), "meta": np.array(json.dumps(meta, sort_keys=True))}


def cli_args(cfg: GenConfig) -> list[str]:
    defaults = GenConfig()
    return [f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f"={v}") for k, v in asdict(cfg).items()
            if k != "version" and (k in ("seed", "train_games", "test_games") or v != getattr(defaults, k))]


def generate(cfg: GenConfig, out: Path, log: Path, *, workers: int = 1, progress: bool = True) -> dict:
    """Play and search the games the log lacks, appending each to it; then write `out`. Returns counts."""
    records = read_log(log, cfg)
    done = {(r["split"], r["game"]) for r in records}
    todo = [(cfg, split, g) for split in SPLITS for g in cfg.game_ids(split) if (split, g) not in done]
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
    arrays = pack([r for r in records if r["game"] in cfg.game_ids(r["split"])], cfg)  # a log may hold more
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
