"""Chess: find the one move that mates in N. Difficulty = N (mate in 1, 2, 3).

Input: the 64 squares as piece tokens, seen from the side to move (a position with black to move
is mirrored and its colours swapped, so the mover is always white at the bottom). Output: two
logits per square, channel 0 for the move's from-square and channel 1 for its to-square (softmax
over the 64 squares each). The answer is right when the predicted move is the puzzle's key and is
legal. A pawn reaching the last rank promotes to a queen: the output has no promotion piece, so
puzzles whose key is an under-promotion are not generated.

Tokens (square index a1 = 0 .. h8 = 63 of the mirrored board):

    0 empty | 1-6 the mover's P N B R Q K | 7-12 the opponent's p n b r q k
    13 the mover's rook that may still castle | 14 the opponent's rook that may still castle
    15 the opponent's pawn that can be taken en passant now (it just advanced two squares and
       a legal en-passant capture exists)

so castling rights and the en-passant square, everything legality depends on, are in the tokens
(the move clocks are not: puzzles near the 75-move draw are not generated).

Data: verified puzzles from tasks/chess_gen.py, shipped in tasks/data/chess/puzzles.npz (see that
module for the command and seed that regenerate it). Train and test puzzles come from different
self-play games, at most one puzzle per game and N. Each puzzle also carries its `source` (the
games' policy: greedy-vs-random or Stockfish self-play) and the second difficulty axis `depth`
(plies a small alpha-beta search needs to rank the key first), readable with
`Chess().puzzles(split, n)`. The split "human" is a third, held-out set: mate puzzles from
human games on lichess.org (tasks/data/chess/human_puzzles.csv, proved by the same search;
provenance in human_puzzles.md), never trained on.

Training draws puzzles with replacement and mirrors the files (a <-> h) of half of those whose
position has no castling right: a rules-preserving symmetry (pawns still move up the board), and
the key's squares are mirrored with it. Castling is not symmetric under it, so those positions
are left as they are.

Decoding prints the move as UCI and SAN on the original board when the tokens came from `parse`
(it remembers the side to move of the FENs it parsed); for other tokens, the side to move is
unknown and the move is shown on the mirrored board, white to move.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import chess
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Batch, Task, TaskInputError

DATA = Path(__file__).resolve().parent / "data" / "chess" / "puzzles.npz"  # package data: in the wheel too
HUMAN = DATA.parent / "human_puzzles.csv"  # held-out puzzles from human games (split "human")
EMPTY, CASTLING_ROOK, THEIR_CASTLING_ROOK, EN_PASSANT_PAWN = 0, 13, 14, 15
VOCAB = 16
FROM, TO = 1, 2  # class ids of targets and predictions: the move's squares; 0 elsewhere
SPLITS = ("train", "test")  # the generated dataset's splits
ALL_SPLITS = SPLITS + ("human",)


# ------------------------------------------------------------------------------------ encoding

def oriented(board: chess.Board) -> chess.Board:
    """The board as the tokens see it: the side to move is white (mirrored and colours swapped if not)."""
    return board if board.turn == chess.WHITE else board.mirror()


def encode(board: chess.Board) -> np.ndarray:
    """(64,) tokens of a position, from the side to move's point of view (module docstring)."""
    b = oriented(board)
    tokens = np.zeros(64, dtype=np.int64)
    for square, piece in b.piece_map().items():
        tokens[square] = piece.piece_type + (0 if piece.color == chess.WHITE else 6)
    for square in chess.scan_forward(b.clean_castling_rights()):
        tokens[square] = CASTLING_ROOK if chess.square_rank(square) == 0 else THEIR_CASTLING_ROOK
    if b.has_legal_en_passant():
        tokens[b.ep_square - 8] = EN_PASSANT_PAWN  # the black pawn that just passed the ep square
    return tokens


_PIECE_TOKEN = {c: i + 1 for i, c in enumerate("PNBRQK")} | {c: i + 7 for i, c in enumerate("pnbrqk")}
_CASTLE_SQUARE = {"K": chess.H1, "Q": chess.A1, "k": chess.H8, "q": chess.A8}


@lru_cache(maxsize=65536)
def _rank_tokens(rank: str) -> np.ndarray:
    """The 8 tokens of one FEN rank (files a..h); ranks repeat a lot, so they are cached."""
    out = []
    for ch in rank:
        out.extend([EMPTY] * int(ch) if ch.isdigit() else [_PIECE_TOKEN[ch]])
    if len(out) != 8:
        raise ValueError(f"FEN rank {rank!r} does not hold 8 squares")
    return np.array(out, dtype=np.int64)


def encode_fen(fen: str) -> np.ndarray:
    """`encode(chess.Board(fen))` read straight from the FEN text, several times faster, for FENs that
    python-chess wrote (`Board.fen()`: castling rights already clean, an en-passant square only
    when a legal capture exists), as the generator's are; any other FEN: use `encode`."""
    placement, turn, castling, ep = fen.split()[:4]
    tokens = np.concatenate([_rank_tokens(rank) for rank in reversed(placement.split("/"))])  # a1 = 0
    for ch in castling.replace("-", ""):
        tokens[_CASTLE_SQUARE[ch]] = CASTLING_ROOK if ch.isupper() else THEIR_CASTLING_ROOK
    if ep != "-":  # the pawn that just moved two squares stands behind the ep square
        square = chess.parse_square(ep)
        tokens[square - 8 if turn == "w" else square + 8] = EN_PASSANT_PAWN
    if turn == "b":  # mirror the ranks and swap the colours, as Board.mirror() does
        tokens = tokens.reshape(8, 8)[::-1].reshape(64).copy()
        mine, theirs = (tokens >= 1) & (tokens <= 6), (tokens >= 7) & (tokens <= 12)
        tokens[mine] += 6
        tokens[theirs] -= 6
        rooks = (tokens == CASTLING_ROOK) | (tokens == THEIR_CASTLING_ROOK)
        tokens[rooks] = CASTLING_ROOK + THEIR_CASTLING_ROOK - tokens[rooks]
    return tokens


def decode_board(tokens) -> chess.Board:
    """The position (white to move) that `encode` maps to these tokens."""
    tokens = [int(t) for t in tokens]
    if len(tokens) != 64 or not all(0 <= t < VOCAB for t in tokens):
        raise ValueError(f"expected 64 chess tokens in [0, {VOCAB}); got {len(tokens)} values")
    board = chess.Board.empty()
    castling = 0
    for square, t in enumerate(tokens):
        if t == EMPTY:
            continue
        if t in (CASTLING_ROOK, THEIR_CASTLING_ROOK):
            board.set_piece_at(square, chess.Piece(chess.ROOK, t == CASTLING_ROOK))
            castling |= chess.BB_SQUARES[square]
        elif t == EN_PASSANT_PAWN:
            board.set_piece_at(square, chess.Piece(chess.PAWN, chess.BLACK))
            board.ep_square = square + 8
        else:
            board.set_piece_at(square, chess.Piece((t - 1) % 6 + 1, t <= 6))
    board.castling_rights = castling
    return board


def move_of(board: chess.Board, from_square: int, to_square: int) -> chess.Move:
    """The move between two squares; a pawn reaching the last rank promotes to a queen."""
    piece = board.piece_at(from_square)
    promotes = (piece is not None and piece.piece_type == chess.PAWN
                and chess.square_rank(to_square) in (0, 7))
    return chess.Move(from_square, to_square, chess.QUEEN if promotes else None)


def target_of(move: chess.Move, turn: chess.Color) -> np.ndarray:
    """(64,) class ids of a move of the side `turn`: FROM at its from-square, TO at its to-square."""
    target = np.zeros(64, dtype=np.int64)
    mirror = (lambda s: s) if turn == chess.WHITE else chess.square_mirror
    target[mirror(move.from_square)] = FROM
    target[mirror(move.to_square)] = TO
    return target


def squares(classes: Tensor) -> tuple[Tensor, Tensor]:
    """(N, 64) class ids -> the from- and to-square of each row, (N,) each (the first if several)."""
    return (classes == FROM).int().argmax(1), (classes == TO).int().argmax(1)


def mirror_files(squares64: Tensor) -> Tensor:
    """(N, 64, ...) per-square values with files a..h reversed (a1 <-> h1): square r*8+f -> r*8+7-f."""
    n = squares64.shape[0]
    return squares64.reshape(n, 8, 8, *squares64.shape[2:]).flip(2).reshape(squares64.shape)


def mirrorable(tokens: Tensor) -> Tensor:
    """(N,) bool: no castling right in the position, so mirroring the files keeps the rules."""
    return ~((tokens == CASTLING_ROOK) | (tokens == THEIR_CASTLING_ROOK)).any(1)


# ------------------------------------------------------------------------------------ the pool

@dataclass(frozen=True)
class Puzzles:
    """The puzzles of one split and N, in the dataset's order (by game); arrays of equal length."""

    fen: np.ndarray  # (M,) str
    key: np.ndarray  # (M,) str, UCI
    depth: np.ndarray  # (M,) int: search depth at which the key is first found (chess_gen.key_depth; -1: not known)
    game: np.ndarray  # (M,) int: the self-play game it comes from (-1: a human game)
    inputs: Tensor  # (M, 64) tokens
    targets: Tensor  # (M, 64) FROM / TO / 0
    source: np.ndarray  # (M,) str: "greedy" / "engine" (the generator's policy) or where a human puzzle came from

    def __len__(self) -> int:
        return len(self.fen)


def _encoded(fens: list[str], keys: list[str], written_by_python_chess: bool) -> tuple[np.ndarray, np.ndarray]:
    inputs, targets = [], []
    for fen, key in zip(fens, keys):
        if written_by_python_chess:  # the generator's FENs: the fast reader gives the same tokens
            inputs.append(encode_fen(fen))
            turn = fen.split()[1] == "w"
        else:
            board = chess.Board(fen)
            inputs.append(encode(board))
            turn = board.turn
        targets.append(target_of(chess.Move.from_uci(key), turn))
    return np.stack(inputs), np.stack(targets)


@lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> dict[tuple[str, int], Puzzles]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("fen", "key", "n", "depth", "game", "split")}
            arrays["source"] = data["source"] if "source" in data.files else np.full(len(arrays["fen"]), b"greedy")
    except (OSError, ValueError, KeyError) as e:
        raise TaskInputError(f"cannot read the chess puzzles {path} ({type(e).__name__}: {e}); "
                                "regenerate them with python -m tasks.chess_gen (see its docstring)") from None
    fens = np.array([f.decode() for f in arrays["fen"]])
    keys = np.array([k.decode() for k in arrays["key"]])
    sources = np.array([k.decode() for k in arrays["source"]])
    inputs, targets = _encoded(list(fens), list(keys), written_by_python_chess=True)
    pools = {}
    for s, split in enumerate(SPLITS):
        for n in np.unique(arrays["n"][arrays["split"] == s]):
            rows = np.flatnonzero((arrays["split"] == s) & (arrays["n"] == n))
            pools[split, int(n)] = Puzzles(
                fens[rows], keys[rows], arrays["depth"][rows].astype(np.int64),
                arrays["game"][rows].astype(np.int64), torch.from_numpy(inputs[rows]),
                torch.from_numpy(targets[rows]), sources[rows])
    return pools


@lru_cache(maxsize=2)
def _load_human(path: str, mtime: float) -> dict[tuple[str, int], Puzzles]:
    try:
        rows = [line.split(",") for line in Path(path).read_text().splitlines()[1:] if line.strip()]
        fens, keys, ns, sources = (np.array(col) for col in zip(*rows))
        ns = ns.astype(np.int64)
    except (OSError, ValueError) as e:
        raise TaskInputError(f"cannot read the human-game chess puzzles {path} ({type(e).__name__}: {e})") from None
    inputs, targets = _encoded(list(fens), list(keys), written_by_python_chess=False)
    pools = {}
    for n in np.unique(ns):
        rows = np.flatnonzero(ns == n)
        pools["human", int(n)] = Puzzles(fens[rows], keys[rows], np.full(len(rows), -1), np.full(len(rows), -1),
                                         torch.from_numpy(inputs[rows]), torch.from_numpy(targets[rows]),
                                         sources[rows])
    return pools


# ------------------------------------------------------------------------------------ the task

PAIR_DIM = 16  # output channels 2.. of each square: a query and a key of this size (move_scores)


def move_scores(logits: Tensor) -> Tensor:
    """(N, 64, C) per-square outputs -> (N, 64, 64) scores of the moves from-square x to-square.

    score(f, t) = from_f + to_t (channels 0 and 1), plus q_f . k_t / sqrt(R) when the output also
    carries a query q and a key k of R = (C - 2) / 2 channels per square: a move's score then
    depends on the pair, not only on each square alone, so two good moves of two pieces do not
    blend into a third. A piece cannot stay on its square: the diagonal is -inf.
    """
    logits = logits.float()
    scores = logits[..., 0, None] + logits[..., None, :, 1]
    r = (logits.shape[-1] - 2) // 2
    if r:  # the sum and the scaled pair term in one baddbmm (a training step scores 16 iterates)
        q, k = logits[..., 2:2 + r], logits[..., 2 + r:2 + 2 * r]
        lead = scores.shape[:-2]
        scores = torch.baddbmm(scores.reshape(-1, 64, 64), q.reshape(-1, 64, r), k.reshape(-1, 64, r).transpose(1, 2),
                               alpha=r ** -0.5).reshape(*lead, 64, 64)
    eye = torch.eye(64, dtype=torch.bool, device=logits.device)
    return scores.masked_fill(eye, float("-inf"))


class Chess(Task):
    name = "chess"
    vocab_size = VOCAB
    # channel 0: from-square logit, 1: to-square logit, then the query and key of move_scores
    # (checkpoints with 2 channels, from before the pair term, still load and score additively)
    n_classes = 2 + 2 * PAIR_DIM
    train_difficulties = (1, 2)
    test_difficulties = (1, 2, 3)
    # A board: global attention with a learned bias per head and (rank, file) offset of the two
    # squares (relations "board8", the same on every square), plus learned absolute squares (the
    # edge, the back rank and the promotion rank matter in chess, unlike in sudoku). Width 128 and 8
    # heads, with bf16 matmuls in the training steps where the CPU or GPU has native bf16 (autocast
    # auto: about 1.5x a float32 step on an AVX512-BF16 CPU; float32 elsewhere, since emulated bf16
    # was 17x slower; evaluation solves in float32). At equal time on an AVX512-BF16 CPU it beats
    # width 64 in float32 (docs/TRAINING.md).
    model_defaults = {"window": None, "causal": False, "n_positions": 64, "relations": "board8", "n_heads": 8,
                      "d_model": 128, "autocast": "auto"}
    # Backpropagation through 12 unrolled plain iterations with the loss on every iterate (the
    # sudoku recipe), 2800 steps: 26 min on 2 threads of an AVX512-BF16 CPU. 16 iterations cost
    # 1.33x a step, so 2400 of them no longer fit 30 min on the slower machines of that kind, and
    # 2800 at 12 gave 60.8 / 39.1 / 36.5% against 60.6 / 37.6 / 35.9 (docs/TRAINING.md). The
    # trained loop converges in about 10 iterations either way.
    solve_defaults = {"backward": "unroll", "max_iter": 12, "loss_every": 1, "solver": "fixed_point_iter"}
    train_defaults = {"steps": 2800, "warmup_steps": 200, "lr": 2e-3, "eval_every": 700, "eval_size": 200}
    # The shipped model (deqloop/models/chess/): 16 unrolled iterations and 8000 steps, two thirds
    # of them on mate in 2 (difficulties are drawn uniformly from the list, so the repeat weights
    # it), about 2 h on 2 threads of an AVX512-BF16 CPU; in float32 on a CPU without native bf16,
    # about 1.7x that.
    presets = {"long": {"model": {"autocast": "auto"}, "solve": {"max_iter": 16},
                        "train": {"steps": 8000, "eval_every": 1000, "ckpt_every": 250,
                                  "train_difficulties": (1, 2, 2)}}}

    mirror_files = True  # training mirrors the files of half the positions without castling rights

    def __init__(self, data: str | Path | None = None, human: str | Path | None = None):
        self.data = Path(data) if data is not None else DATA
        self.human = Path(human) if human is not None else HUMAN
        self._parsed: dict[bytes, chess.Board] = {}  # tokens -> the board parse() read them from

    def eval_max_iter(self, difficulty: int) -> int:
        return 16 * difficulty  # a deeper mate needs more iterations

    def puzzles(self, split: str, n: int) -> Puzzles:
        """The pool of mate-in-`n` puzzles of `split`, loaded from the dataset file at first use."""
        if split not in ALL_SPLITS:
            raise ValueError(f"split must be one of {', '.join(ALL_SPLITS)}; got {split!r}")
        path = self.human if split == "human" else self.data
        try:
            mtime = path.stat().st_mtime
        except OSError:
            raise TaskInputError(f"chess puzzles not found at {path}; regenerate them with "
                                    "python -m tasks.chess_gen (see its docstring)") from None
        pools = (_load_human if split == "human" else _load)(str(path), mtime)
        if (split, n) not in pools:
            have = sorted(d for s, d in pools if s == split)
            raise TaskInputError(f"no {split} chess puzzles of difficulty {n} (mate in {n}) in {path}; "
                             f"available: {', '.join(map(str, have))}")
        return pools[split, n]

    def generate(self, n: int, difficulty: int, rng: np.random.Generator, split: str = "train") -> Batch:
        """n puzzles: train draws from its pool with replacement (and mirrors files, see the module
        docstring); test and human return the pool's first n, unchanged.

        Asking for more test puzzles than the pool holds is a TaskInputError, as for sudoku.
        """
        pool = self.puzzles(split, difficulty)
        if split == "train":
            rows = torch.from_numpy(rng.integers(0, len(pool), n))
        else:
            if n > len(pool):
                raise TaskInputError(f"the chess {split} pool of mate in {difficulty} holds {len(pool)} puzzles, "
                                     f"{n} were asked for")
            rows = torch.arange(n)
        inputs, targets = pool.inputs[rows], pool.targets[rows]
        if split == "train" and self.mirror_files:
            flip = torch.from_numpy(rng.random(n) < 0.5) & mirrorable(inputs)
            inputs = torch.where(flip[:, None], mirror_files(inputs), inputs)
            targets = torch.where(flip[:, None], mirror_files(targets), targets)
        return Batch(inputs, targets, torch.full((len(rows),), difficulty, dtype=torch.long))

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Half the cross-entropy of the key over the 64 x 63 moves of `move_scores` (half, so that a
        uniform guess costs about log 64, as the mean of two 64-square cross-entropies did)."""
        from_sq, to_sq = squares(targets)
        return 0.5 * F.cross_entropy(move_scores(logits).flatten(1), from_sq * 64 + to_sq)

    def predict(self, logits: Tensor, inputs: Tensor) -> Tensor:
        """(N, 64): FROM and TO at the squares of the best-scoring move of `move_scores` (from != to).

        No legality mask, so `legal` measures the model.
        """
        best = move_scores(logits).flatten(1).argmax(1)
        rows = torch.arange(len(logits), device=logits.device)
        pred = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
        pred[rows, best // 64] = FROM
        pred[rows, best % 64] = TO
        return pred

    def _legal(self, pred: Tensor, inputs: Tensor) -> Tensor:
        """(N,) bool: the predicted move is legal on the board decoded from the tokens."""
        from_sq, to_sq = squares(pred.cpu())
        legal = []
        for tokens, f, t in zip(inputs.cpu().tolist(), from_sq.tolist(), to_sq.tolist()):
            board = decode_board(tokens)
            legal.append(board.is_legal(move_of(board, f, t)))
        return torch.tensor(legal, dtype=torch.bool, device=pred.device)

    def exact_match(self, pred: Tensor, batch: Batch) -> Tensor:
        """(N,) bool: the predicted move is the key move and is legal."""
        return (pred == batch.targets).all(1) & self._legal(pred, batch.inputs)

    def metrics(self, pred: Tensor, batch: Batch, logits: Tensor | None = None) -> dict[str, Tensor]:
        """legal, from_acc, to_acc of the raw prediction; with `logits`, also key_legal: the key is
        the legal move of highest `move_scores` score (a second reading, beside exact match)."""
        (pf, pt), (tf, tt) = squares(pred), squares(batch.targets)
        out = {"legal": self._legal(pred, batch.inputs).float(),
               "from_acc": (pf == tf).float(), "to_acc": (pt == tt).float()}
        if logits is not None:
            bf, bt = self.best_legal(logits, batch.inputs)
            out["key_legal"] = ((bf == tf.cpu()) & (bt == tt.cpu())).float().to(pred.device)
        return out

    @staticmethod
    def best_legal(logits: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """(N,) from- and to-squares of the legal move with the highest `move_scores` score (queen
        promotions only, as the output reads a promotion); (-1, -1) where no move is legal."""
        scores = move_scores(logits.detach()).cpu()
        best_from, best_to = [], []
        for tokens, s in zip(inputs.cpu().tolist(), scores):
            board = decode_board(tokens)
            moves = [(m.from_square, m.to_square) for m in board.generate_legal_moves()
                     if m.promotion in (None, chess.QUEEN)]
            if not moves:
                best_from.append(-1)
                best_to.append(-1)
                continue
            f, t = torch.tensor(moves).T
            i = int(s[f, t].argmax())
            best_from.append(int(f[i]))
            best_to.append(int(t[i]))
        return torch.tensor(best_from), torch.tensor(best_to)

    def difficulty_label(self, difficulty: int) -> str:
        return f"mate in {difficulty}"

    def decode(self, inputs: Tensor, pred: Tensor) -> str:
        """The predicted move as 'UCI SAN' on the original board (e.g. 'h5f7 Qxf7#'); see the module docstring."""
        tokens = inputs.cpu().long()
        board = decode_board(tokens.tolist())
        (f,), (t,) = (s.tolist() for s in squares(pred.cpu()[None]))
        move = move_of(board, f, t)
        original = self._parsed.get(tokens.numpy().tobytes())
        note = ""
        if original is not None:
            if original.turn == chess.BLACK:
                move = chess.Move(chess.square_mirror(move.from_square), chess.square_mirror(move.to_square),
                                  move.promotion)
            board = original
        else:
            note = " (side to move unknown: shown as white, board mirrored if black was to move)"
        if not board.is_legal(move):
            return f"{move.uci()} (illegal in this position){note}"
        return f"{move.uci()} {board.san(move)}{note}"

    def parse(self, text: str) -> Tensor:
        """A FEN as tokens (1, 64); raises TaskInputError (one line) if malformed, illegal, or game over."""
        fen = text.strip()
        shown = repr(fen if len(fen) <= 100 else fen[:100] + "...")
        if not fen:
            raise TaskInputError("chess input is empty; give a FEN, e.g. "
                                 "'6k1/5ppp/8/8/8/8/5PPP/3R2K1 w - - 0 1'")
        try:
            board = chess.Board(fen)
        except ValueError as e:
            raise TaskInputError(f"malformed FEN {shown}: {' '.join(str(e).split())}") from None
        status = board.status()
        if status != chess.STATUS_VALID:
            problems = [name[len("STATUS_"):].lower().replace("_", " ") for name in dir(chess)
                        if name.startswith("STATUS_") and name != "STATUS_VALID" and status & getattr(chess, name)]
            raise TaskInputError(f"illegal position in FEN {shown}: {', '.join(sorted(problems))}")
        outcome = board.outcome()
        if outcome is not None:
            raise TaskInputError(f"the game is over in FEN {shown} ({outcome.termination.name.lower()}); "
                                 "there is no move to find")
        tokens = torch.from_numpy(encode(board))
        self._parsed[tokens.numpy().tobytes()] = board
        return tokens[None]
