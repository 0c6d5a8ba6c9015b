"""Exact mate search for chess puzzles, and the search depth at which a key move is first found.

`find_mate(board, N)` proves that a position has a mate in N with exactly one first move (the
key), by exhaustive search over checking moves with a node budget; python-chess does the rules.
"""

from __future__ import annotations

import chess

VALUE = {chess.PAWN: 1, chess.KNIGHT: 3, chess.BISHOP: 3, chess.ROOK: 5, chess.QUEEN: 9, chess.KING: 0}


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
