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
self-play games, at most one puzzle per game and N. Each puzzle also carries the second
difficulty axis `depth` (plies a small alpha-beta search needs to rank the key first), readable
with `Chess().puzzles(split, n)`.

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
EMPTY, CASTLING_ROOK, THEIR_CASTLING_ROOK, EN_PASSANT_PAWN = 0, 13, 14, 15
VOCAB = 16
FROM, TO = 1, 2  # class ids of targets and predictions: the move's squares; 0 elsewhere
SPLITS = ("train", "test")


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


# ------------------------------------------------------------------------------------ the pool

@dataclass(frozen=True)
class Puzzles:
    """The puzzles of one split and N, in the dataset's order (by game); arrays of equal length."""

    fen: np.ndarray  # (M,) str
    key: np.ndarray  # (M,) str, UCI
    depth: np.ndarray  # (M,) int: search depth at which the key is first found (chess_gen.key_depth)
    game: np.ndarray  # (M,) int: the self-play game it comes from
    inputs: Tensor  # (M, 64) tokens
    targets: Tensor  # (M, 64) FROM / TO / 0

    def __len__(self) -> int:
        return len(self.fen)


@lru_cache(maxsize=4)
def _load(path: str, mtime: float) -> dict[tuple[str, int], Puzzles]:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("fen", "key", "n", "depth", "game", "split")}
    except (OSError, ValueError, KeyError) as e:
        raise TaskInputError(f"cannot read the chess puzzles {path} ({type(e).__name__}: {e}); "
                                "regenerate them with python -m tasks.chess_gen (see its docstring)") from None
    fens = [f.decode() for f in arrays["fen"]]
    keys = [k.decode() for k in arrays["key"]]
    inputs, targets = [], []
    for fen, key in zip(fens, keys):
        board = chess.Board(fen)
        inputs.append(encode(board))
        targets.append(target_of(chess.Move.from_uci(key), board.turn))
    inputs, targets = np.stack(inputs), np.stack(targets)
    pools = {}
    for s, split in enumerate(SPLITS):
        for n in np.unique(arrays["n"][arrays["split"] == s]):
            rows = np.flatnonzero((arrays["split"] == s) & (arrays["n"] == n))
            pools[split, int(n)] = Puzzles(
                np.array(fens)[rows], np.array(keys)[rows], arrays["depth"][rows].astype(np.int64),
                arrays["game"][rows].astype(np.int64), torch.from_numpy(inputs[rows]),
                torch.from_numpy(targets[rows]))
    return pools


# ------------------------------------------------------------------------------------ the task

class Chess(Task):
    name = "chess"
    vocab_size = VOCAB
    n_classes = 2  # channel 0: from-square logit, channel 1: to-square logit
    train_difficulties = (1, 2)
    test_difficulties = (1, 2, 3)
    # A board: every square may matter to every other, at a fixed size.
    model_defaults = {"window": None, "causal": False, "n_positions": 64}
    # Backpropagation through 16 unrolled plain iterations, the prefix-sums recipe (other recipes
    # untried). A 300-step run with these defaults lowered the loss from 4.2 (uniform) to about 2.5;
    # it had learned mostly which piece moves: from-square right on 62% of the test mates in 1.
    solve_defaults = {"backward": "unroll", "max_iter": 16, "solver": "fixed_point_iter"}

    def __init__(self, data: str | Path | None = None):
        self.data = Path(data) if data is not None else DATA
        self._parsed: dict[bytes, chess.Board] = {}  # tokens -> the board parse() read them from

    def eval_max_iter(self, difficulty: int) -> int:
        return 16 * difficulty  # a deeper mate needs more iterations

    def puzzles(self, split: str, n: int) -> Puzzles:
        """The pool of mate-in-`n` puzzles of `split`, loaded from the dataset file at first use."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        try:
            mtime = self.data.stat().st_mtime
        except OSError:
            raise TaskInputError(f"chess puzzles not found at {self.data}; regenerate them with "
                                    "python -m tasks.chess_gen (see its docstring)") from None
        pools = _load(str(self.data), mtime)
        if (split, n) not in pools:
            have = sorted(d for s, d in pools if s == split)
            raise TaskInputError(f"no {split} chess puzzles of difficulty {n} (mate in {n}) in {self.data}; "
                             f"available: {', '.join(map(str, have))}")
        return pools[split, n]

    def generate(self, n: int, difficulty: int, rng: np.random.Generator, split: str = "train") -> Batch:
        """n puzzles: train draws from its pool with replacement; test returns the pool's first n.

        Asking for more test puzzles than the pool holds is a TaskInputError, as for sudoku.
        """
        pool = self.puzzles(split, difficulty)
        if split == "train":
            rows = torch.from_numpy(rng.integers(0, len(pool), n))
        else:
            if n > len(pool):
                raise TaskInputError(f"the chess test pool of mate in {difficulty} holds {len(pool)} puzzles, "
                                     f"{n} were asked for")
            rows = torch.arange(n)
        return Batch(pool.inputs[rows], pool.targets[rows], torch.full((len(rows),), difficulty, dtype=torch.long))

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean of the cross-entropies of the from-square and the to-square, each over 64 squares."""
        from_sq, to_sq = squares(targets)
        return 0.5 * (F.cross_entropy(logits[..., 0], from_sq) + F.cross_entropy(logits[..., 1], to_sq))

    def predict(self, logits: Tensor, inputs: Tensor) -> Tensor:
        """(N, 64): FROM at the argmax of channel 0, TO at the argmax of channel 1 over the other squares.

        The best pair (from != to) of summed logits; no legality mask, so `legal` measures the model.
        """
        from_logits, to_logits = logits[..., 0].float(), logits[..., 1].float()  # (N, 64) each
        f1, t1 = from_logits.argmax(1), to_logits.argmax(1)
        clash = f1 == t1  # the same square: keep the better of (best from, 2nd to) and (2nd from, best to)
        rows = torch.arange(len(logits), device=logits.device)
        f2 = from_logits.scatter(1, f1[:, None], -torch.inf).argmax(1)
        t2 = to_logits.scatter(1, t1[:, None], -torch.inf).argmax(1)
        keep_from = from_logits[rows, f1] + to_logits[rows, t2] >= from_logits[rows, f2] + to_logits[rows, t1]
        from_sq = f1
        to_sq = torch.where(clash & keep_from, t2, t1)
        from_sq = torch.where(clash & ~keep_from, f2, from_sq)
        pred = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
        pred[rows, from_sq] = FROM
        pred[rows, to_sq] = TO
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

    def metrics(self, pred: Tensor, batch: Batch) -> dict[str, Tensor]:
        (pf, pt), (tf, tt) = squares(pred), squares(batch.targets)
        return {"legal": self._legal(pred, batch.inputs).float(),
                "from_acc": (pf == tf).float(), "to_acc": (pt == tt).float()}

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
