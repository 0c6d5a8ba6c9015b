"""A single-layer looped transformer whose output is a fixed point z* = f(z*, x).

    x = embed(tokens)                       # (B, T, d), once
    z* = f(z*, x)  found by a solver        # one shared block, `recall` x `norm` (docs/DESIGN.md §1)
    logits = head(z*)                       # (B, T, n_classes)

Positions, three ways:
- local attention with a learned bias per head and relative offset (window `window`), so the
  cell is the same at every position and any length; the number of iterations, not the
  weights, decides how far information travels;
- global attention plus learned absolute positions (`window=None`, `n_positions`);
- board-structured attention (`window=None`, `relations=NAME`): a scheme of RELATIONS gives
  every pair of positions a relation id (sudoku: same row / column / box; a chess board: the
  (rank, file) offset), attention adds a learned bias per head and relation, and the scheme may
  mask some relations out entirely (sudoku peers only). The cell is then the same at every
  position that has the same relations, so the board's symmetries hold by construction.
"""

from __future__ import annotations

import functools
import numbers
import types
import typing
from dataclasses import asdict, dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from deqloop.errors import ConfigError, ConfigTypeError, InputError
from solvers import LOOP_DEFAULTS, UnknownSolverError, check_options, get_solver
from solvers.dropout import VariationalDropout, reset_dropout
from solvers.implicit import fixed_point
from solvers.normalize import apply_spectral_norm, apply_weight_norm, reset_norm
from solvers.result import SolverResult

RECALLS = ("none", "standard", "internal")
NORMS = ("none", "pre", "post", "outer")
Z0S = ("zeros", "input", "random")
CELL_NORMS = (None, "spectral", "weight")
AUTOCASTS = (None, "bf16", "auto")  # ModelConfig.autocast
BACKWARDS = ("ift", "phantom", "unroll", "progressive")


def sudoku_relations(peers_only: bool) -> tuple[Tensor, int]:
    """Relation ids (81, 81) of two sudoku cells, row by row: 0 self, 1 same row only, 2 same column
    only, 3 same box only, 4 same row and box, 5 same column and box, 6 unrelated (-1, masked out,
    when `peers_only`: a cell then sees itself and its 20 peers)."""
    i = torch.arange(81)
    row, col = i // 9, i % 9
    box = (row // 3) * 3 + col // 3
    same = lambda a: a[:, None] == a[None, :]
    r, c, b = same(row), same(col), same(box)
    ids = torch.full((81, 81), 6)
    ids[r & ~b], ids[c & ~b], ids[b & ~r & ~c] = 1, 2, 3
    ids[r & b], ids[c & b] = 4, 5
    ids[torch.eye(81, dtype=torch.bool)] = 0
    if peers_only:
        ids[ids == 6] = -1
    return ids, 6 if peers_only else 7


def board_relations(ranks: int = 8, files: int = 8) -> tuple[Tensor, int]:
    """Relation ids of two squares of a ranks x files board, square index rank * files + file:
    one id per (rank offset, file offset), so the same offset is the same relation on every square."""
    i = torch.arange(ranks * files)
    dr = (i // files)[None, :] - (i // files)[:, None] + ranks - 1
    df = (i % files)[None, :] - (i % files)[:, None] + files - 1
    return dr * (2 * files - 1) + df, (2 * ranks - 1) * (2 * files - 1)


# name -> () -> (ids (T, T) int64 with -1 where attention is masked out, number of relations)
RELATIONS = {
    "sudoku": lambda: sudoku_relations(peers_only=False),
    "sudoku_peers": lambda: sudoku_relations(peers_only=True),
    "board8": lambda: board_relations(8, 8),
}


def check_field_types(cfg) -> None:
    """ConfigTypeError (a TypeError) naming the field when a config dataclass holds a value of the wrong kind (a
    string where a number goes: a damaged checkpoint, a hand-edited config.json)."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        value, want = getattr(cfg, f.name), hints[f.name]
        options = typing.get_args(want) if isinstance(want, types.UnionType) else (want,)
        if value is None and type(None) in options:
            continue
        for option in options:
            kind = typing.get_origin(option) or option
            if kind is bool:
                ok = isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
            elif kind is float:
                ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            else:
                ok = isinstance(value, kind) if isinstance(kind, type) else True
            if ok:
                break
        else:
            names = " or ".join("None" if o is type(None) else getattr(typing.get_origin(o) or o, "__name__", str(o))
                                for o in options)
            raise ConfigTypeError(f"{f.name} must be {names}, got {value!r}")


@dataclass
class ModelConfig:
    vocab_size: int  # input token ids are in [0, vocab_size)
    n_classes: int  # output classes per position
    d_model: int = 64  # width of the loop state z
    n_heads: int = 4  # attention heads; d_model must divide by it
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * d_model
    window: int | None = 4  # local attention: each position sees `window` positions (None: all)
    causal: bool = True  # attend to earlier positions only (with `window`: the last `window`)
    n_positions: int = 0  # learned absolute positions added to the input (0: none; fixed-size tasks)
    recall: str = "standard"  # input injection: none | standard | internal (DESIGN §1)
    norm: str = "outer"  # normalization placement: none | pre | post | outer (DESIGN §1)
    z0: str = "input"  # initial state: zeros | input (the embedded x) | random (seeded)
    z0_seed: int = 0  # seed of the random z0, so a model's z0 is reproducible
    relations: str | None = None  # board-structured attention: a key of RELATIONS (needs window=None)
    cell_norm: str | None = None  # spectral | weight: normalize the loop block's linear layers (solvers.normalize)
    dropout: float = 0.0  # variational dropout on the block's two residual branches: one mask per solve
    autocast: str | None = None  # bf16: in training steps, the block's matmuls in bfloat16 (torch.autocast);
    #                              its output, the solver's residuals, tolerances and Anderson's least squares
    #                              stay float32, and solves without gradient (eval, solve, diagnose) run float32.
    #                              auto: bf16 where the device runs it natively, else float32 (autocast_dtype)

    def __post_init__(self):
        check_field_types(self)
        for name, value, valid in (("recall", self.recall, RECALLS), ("norm", self.norm, NORMS),
                                   ("z0", self.z0, Z0S)):
            if value not in valid:
                raise ConfigError(f"{name} must be one of {', '.join(valid)}; got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"window must be >= 1 or None, got {self.window}")
        if self.cell_norm not in CELL_NORMS:
            raise ConfigError(f"cell_norm must be one of {', '.join(map(str, CELL_NORMS))}; got {self.cell_norm!r}")
        if self.autocast not in AUTOCASTS:
            raise ConfigError(f"autocast must be bf16, auto or None; got {self.autocast!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.relations is not None:
            if self.relations not in RELATIONS:
                raise ConfigError(f"relations must be one of {', '.join(RELATIONS)} or None; got {self.relations!r}")
            if self.window is not None or self.causal:
                raise ConfigError("relations need global, non-causal attention (window=None, causal=False)")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SolveConfig:
    """How the loop is solved and differentiated."""

    solver: str = "anderson"  # forward solver, any name in solvers.SOLVERS
    max_iter: int = 40  # forward evaluations of f at most
    tol: float = LOOP_DEFAULTS["tol"]  # relative residual at which a sample stops (the solvers' default)
    solver_options: dict | None = None  # extra options of the solver (m, beta, reg, tau ...)
    backward: str = "ift"  # ift | phantom | unroll (max_iter steps) | progressive (unroll + deep-thinking term)
    b_solver: str = "anderson"  # solver of the IFT adjoint system
    b_max_iter: int = 40
    b_tol: float = 1e-4
    phantom_steps: int = 1  # k of phantom / k-step gradients, and of the progressive loss
    progressive_alpha: float = 0.5  # weight of the progressive term (deep thinking); 1: that term alone
    loss_every: int = 0  # unroll: 0 scores the last iterate only; k scores every k-th differentiated iterate too
    loss_gamma: float | None = None  # those scores' weights: None all alike; g: the k-th of n gamma^(n-1-k) (fp correction)
    detach_iters: int = 0  # unroll: of the max_iter iterations, the first this many run without gradient
    detach_random: bool = False  # unroll: draw the no-gradient prefix from 0..detach_iters at every step

    def __post_init__(self):
        check_field_types(self)
        try:  # solvers/ stands alone and raises its own errors; here they are a config's
            get_solver(self.solver)
            get_solver(self.b_solver)
            check_options(self.solver, self.forward_options())
        except (UnknownSolverError, TypeError) as e:
            raise ConfigError(str(e)) from None
        if self.backward not in BACKWARDS:
            raise ConfigError(f"backward must be one of {', '.join(BACKWARDS)}; got {self.backward!r}")
        if not 0 <= self.progressive_alpha <= 1:
            raise ConfigError(f"progressive_alpha must be in [0, 1], got {self.progressive_alpha}")
        if self.loss_every < 0 or not 0 <= self.detach_iters < self.max_iter:
            raise ConfigError(f"need loss_every >= 0 and 0 <= detach_iters < max_iter={self.max_iter}; "
                             f"got {self.loss_every} and {self.detach_iters}")
        if self.loss_gamma is not None and not (0 < self.loss_gamma <= 1 and self.loss_every):
            raise ConfigError(f"loss_gamma needs loss_every > 0 and a value in (0, 1]; got {self.loss_gamma}")
        if (self.loss_every or self.detach_iters or self.detach_random) and self.backward != "unroll":
            raise ConfigError(f"loss_every and detach_iters belong to backward='unroll', not {self.backward!r}")

    def forward_options(self, max_iter: int | None = None, tol: float | None = None) -> dict:
        return {"max_iter": self.max_iter if max_iter is None else max_iter,
                "tol": self.tol if tol is None else tol, "stop_mode": "rel",
                **(self.solver_options or {})}

    @property
    def gradient(self) -> str:
        """How the solve is differentiated (solvers.implicit GRADS): the progressive loss trains by
        unrolling the loop, with its extra term added by deqloop.objective."""
        return "unroll" if self.backward == "progressive" else self.backward

    def to_dict(self) -> dict:
        return asdict(self)


class Attention(nn.Module):
    """Multi-head self-attention, local (banded, relative-position bias) or global."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.window, self.causal = cfg.n_heads, cfg.window, cfg.causal
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        # 1/sqrt(E) on q's rows of the qkv weight and bias: q comes out scaled for the written-out
        # attentions (_biased, _local), a 3d x d product instead of a (B, H, T, E) one each way
        scale = torch.ones(3 * cfg.d_model)
        scale[: cfg.d_model] = (cfg.d_model // cfg.n_heads) ** -0.5
        self.register_buffer("q_scale", scale, persistent=False)
        self.relation_bias = None
        if cfg.relations is not None:
            ids, n_relations = RELATIONS[cfg.relations]()
            # a buffer, not state: rebuilt from the config, so old checkpoints stay loadable
            self.register_buffer("relation_ids", ids.clamp_min(0), persistent=False)
            self.register_buffer("relation_mask", ids < 0, persistent=False)
            self.has_masked = bool((ids < 0).any())  # sudoku_peers masks non-peers; board8 masks nothing
            self.relation_bias = nn.Parameter(torch.zeros(cfg.n_heads, n_relations))
        if cfg.window is not None:
            # offsets -left .. +right relative to the query position
            self.left = cfg.window - 1 if cfg.causal else cfg.window // 2
            self.right = 0 if cfg.causal else cfg.window - 1 - cfg.window // 2
            self.rel_bias = nn.Parameter(torch.zeros(cfg.n_heads, self.left + self.right + 1))
            # Positions past either end of the sequence hold this learned state instead of being
            # masked: softmax averages, so with masking a position near the start could not
            # tell "1" from "1 1", and a recurrence like parity needs to know where it starts.
            self.boundary = nn.Parameter(0.02 * torch.randn(cfg.d_model))

    def forward(self, h: Tensor, window_mask: Tensor | None = None) -> Tensor:
        """window_mask (B, 1, T, W): `window_mask(segments)` of packed strings (local attention only)."""
        if self.window is not None:
            y = self._local(h, window_mask)
        else:
            if self.relation_bias is None:
                q, k, v = rearrange(self.qkv(h), "b t (three h e) -> three b h t e", three=3, h=self.n_heads)
                y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            else:
                y = self._biased(*self._scaled_qkv(h))
        return self.out(rearrange(y, "b h t e -> b t (h e)"))

    def _scaled_qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q / sqrt(E), k, v (B, H, T, E) of h: the scale applied to q's weight rows and bias."""
        qkv = F.linear(h, self.qkv.weight * self.q_scale[:, None], self.qkv.bias * self.q_scale)
        return rearrange(qkv, "b t (three h e) -> three b h t e", three=3, h=self.n_heads)

    def _relation_mask(self, t: int) -> Tensor:
        """The additive attention bias (H, T, T) of the relation scheme, -inf where masked out."""
        if t != self.relation_ids.shape[0]:
            raise InputError(f"input length {t} does not fit the {self.relation_ids.shape[0]}-position relation scheme")
        bias = self.relation_bias[:, self.relation_ids]  # (H, T, T)
        return bias.masked_fill(self.relation_mask, float("-inf")) if self.has_masked else bias

    def _biased(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """softmax(q k^T + bias) v for q already scaled by 1/sqrt(E) (_scaled_qkv), written out.
        scaled_dot_product_attention with a bias that needs a gradient takes its math path on CPU,
        whose fully-masked-row checks (isneginf, all, where over the (B, H, T, T) scores) and
        float32 round trips under bf16 autocast were a quarter of a chess training step; here the
        scores stay in the matmul's dtype (the bias is cast to it) (bench/throughput.py)."""
        scores = q @ k.transpose(-1, -2)
        scores = scores + self._relation_mask(q.shape[2]).to(scores.dtype)  # relations are never causal
        return scores.softmax(-1) @ v

    def window_mask(self, segments: Tensor) -> Tensor:
        """(B, 1, T, W) bool: whether query i's window offset o lands in i's own string, for the
        packed strings' ids `segments` (B, T) (deqloop.packing). The same at every iteration: a
        solve computes it once (LoopedTransformer.cell)."""
        if self.window is None:
            raise ValueError("packed segments need local attention (window set)")
        t, w = segments.shape[1], self.left + self.right + 1
        seg_pad = F.pad(segments, (self.left, self.right), value=-1)
        return torch.stack([segments == seg_pad[:, o: o + t] for o in range(w)], dim=-1)[:, None]

    def _local(self, h: Tensor, window_mask: Tensor | None = None) -> Tensor:
        b, t, d = h.shape
        w = self.left + self.right + 1
        edge = self.boundary.expand(b, 1, d)
        h_pad = torch.cat([edge.expand(b, self.left, d), h, edge.expand(b, self.right, d)], dim=1)
        q, k, v = self._scaled_qkv(h_pad)
        q = q[:, :, self.left: self.left + t]  # (B, H, T, E): real positions only, scaled by 1/sqrt(E)
        # one shifted slice of the keys / values per window offset o: query i sees padded key i + o.
        # Views, not copies: 2x faster than unfolding (B, H, T, E, W) windows (bench/throughput.py).
        scores = torch.stack([(q * k[:, :, o: o + t]).sum(-1) for o in range(w)], dim=-1)
        if window_mask is not None and w > 1:
            return self._local_packed(q, k, v, scores, window_mask)
        p = (scores + self.rel_bias[:, None, :]).softmax(-1)  # (B, H, T, W), bias (H, 1, W) by offset
        return sum(p[..., o: o + 1] * v[:, :, o: o + t] for o in range(w))

    def _local_packed(self, q: Tensor, k: Tensor, v: Tensor, scores: Tensor, inside: Tensor) -> Tensor:
        """_local's attention for strings packed end to end (deqloop.packing): where query i's
        offset o lands in another string (`inside` False, `window_mask`), it sees the boundary
        state's key and value instead, as it would past the end of its own padded row."""
        t, w = q.shape[2], scores.shape[-1]
        edge = slice(0, 1) if self.left else slice(-1, None)  # a padded position holding the boundary state
        edge_k, edge_v = k[:, :, edge], v[:, :, edge]  # (B, H, 1, E)
        scores = torch.where(inside, scores, (q * edge_k).sum(-1, keepdim=True))
        p = (scores + self.rel_bias[:, None, :]).softmax(-1)
        p_in = p.masked_fill(~inside, 0.0)
        out = sum(p_in[..., o: o + 1] * v[:, :, o: o + t] for o in range(w))
        return out + (p - p_in).sum(-1, keepdim=True) * edge_v


class LoopBlock(nn.Module):
    """The shared block f(z, x) with the `recall` and `norm` placements of DESIGN §1."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.recall, self.norm = cfg.recall, cfg.norm
        self.attn = Attention(cfg)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(), nn.Linear(cfg.mlp_ratio * d, d))
        self.inject = nn.Linear(d, d, bias=False) if cfg.recall != "none" else None  # P
        use_ln = cfg.norm != "none"
        self.ln1 = nn.LayerNorm(d) if use_ln else nn.Identity()
        self.ln2 = nn.LayerNorm(d) if use_ln else nn.Identity()
        self.ln_out = nn.LayerNorm(d) if cfg.norm == "outer" else nn.Identity()
        self.drop_attn = VariationalDropout(cfg.dropout) if cfg.dropout else None
        self.drop_mlp = VariationalDropout(cfg.dropout) if cfg.dropout else None
        self.cell_norm = cfg.cell_norm
        if cfg.cell_norm == "spectral":  # starting vectors from the RNG build_model seeded
            apply_spectral_norm(self, generator=None)
        elif cfg.cell_norm == "weight":
            apply_weight_norm(self)

    def forward(self, z: Tensor, x: Tensor, rows: Tensor | None = None,
                injected: Tensor | None = None, window_mask: Tensor | None = None) -> Tensor:  # (B, T, d) x2 -> (B, T, d)
        """rows: which samples of the solve z and x are (a solver's active sub-batch), for dropout.
        injected: P x (`self.inject(x)`) computed once for the solve, so the iterations do not
        recompute it (LoopedTransformer.cell); None computes it here. window_mask: the attention's
        mask of packed strings (Attention.window_mask)."""
        if self.cell_norm:  # the normalized weights from their parameters, fresh at every call (cheap)
            reset_norm(self, power=False)
        attn = lambda h: self._drop(self.drop_attn, self.attn(h, window_mask), rows)
        mlp = lambda h: self._drop(self.drop_mlp, self.mlp(h), rows)
        if self.recall != "none" and injected is None:
            injected = self.inject(x)
        h = z + injected if self.recall == "standard" else z
        if self.norm == "post":
            h = self.ln1(h + attn(h))
            if self.recall == "internal":
                h = h + injected
            return self.ln2(h + mlp(h))
        # pre, outer, none: pre-norm sublayers (identity norms for none)
        h = h + attn(self.ln1(h))
        if self.recall == "internal":
            h = h + injected
        h = h + mlp(self.ln2(h))
        return self.ln_out(h)  # outer normalization of the loop state

    @staticmethod
    def _drop(layer: VariationalDropout | None, h: Tensor, rows: Tensor | None) -> Tensor:
        return h if layer is None else layer(h, rows)

    def start_solve(self, generator: torch.Generator | None) -> None:
        """Once per solve in training: one power iteration of a spectral norm, new dropout masks."""
        if self.training and self.cell_norm == "spectral":
            reset_norm(self, power=True)
        if self.drop_attn is not None:
            if self.training and generator is None:
                raise ValueError("dropout draws its masks from a torch.Generator; pass one to the solve")
            reset_dropout(self, generator)


class LoopedTransformer(nn.Module):
    """Embedding, the loop cell `f(z, x)`, and the output head; `forward` solves the loop.

    The pieces, for code that runs the loop its own way (training, diagnose):
    embed_input(tokens) -> x, z_init(x) -> z0, f(z, x) / cell(x), solve(x, z0, ...), head_logits(z).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # N(0, 1) like the token embedding: zero positions leave every cell alike, a symmetry the
        # gradient barely breaks (sudoku stayed at its uniform-guess loss for 800 steps)
        self.pos = nn.Parameter(torch.randn(cfg.n_positions, cfg.d_model)) if cfg.n_positions else None
        self.block = LoopBlock(cfg)
        self.ln_head = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        self.backward_result = None  # SolverResult of the last IFT adjoint solve (backward="ift")
        self.__dict__["compiled_block"] = None  # torch.compile of the block, used in training mode only

    def compile_block(self, enable: bool = True) -> None:
        """Run the block through torch.compile in training mode where gradients are on (eval and
        no-gradient iterations stay eager: their sub-batch shapes and grad mode would recompile);
        enable=False goes back to eager. Not a submodule: the state dict
        and checkpoints are the same either way."""
        self.__dict__["compiled_block"] = torch.compile(self.block) if enable else None

    def embed_input(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, d)
        x = self.embed(tokens)
        if self.pos is not None:
            if tokens.shape[1] > self.pos.shape[0]:
                raise InputError(f"input length {tokens.shape[1]} exceeds n_positions={self.pos.shape[0]}")
            x = x + self.pos[: tokens.shape[1]]
        return x

    def f(self, z: Tensor, x: Tensor, rows: Tensor | None = None, injected: Tensor | None = None,
          window_mask: Tensor | None = None) -> Tensor:
        """One iteration of the loop: z_{k+1} = f(z_k, x) (rows: the samples of a sub-batch;
        injected: `self.injection(x)` of the same grad mode, to reuse it across iterations;
        window_mask: `self.window_mask(segments)` of packed strings, deqloop.packing)."""
        # Compilation and bf16 apply to training steps only: no-grad iterations stay eager (no
        # recompiles for sub-batch shapes) and float32 (a bf16 solve never meets a 1e-3 tolerance,
        # its rounding is ~1e-2, while float32 solves of the same weights converge: docs/TRAINING.md)
        training_step = self.training and torch.is_grad_enabled()
        block = self.compiled_block if training_step and self.compiled_block is not None else self.block
        dtype = self._step_dtype(z.device)
        if dtype is None:
            return block(z, x, rows, injected, window_mask)
        with torch.autocast(z.device.type, dtype=dtype):
            return block(z, x, rows, injected, window_mask).to(z.dtype)

    def injection(self, x: Tensor) -> Tensor | None:
        """The recall term P x that every iteration adds (None without recall), computed as `f`
        would under the current grad mode (a bf16 matmul in an autocast training step) and held in
        x's dtype, so the gradients the iterations send it add up in float32, not in bf16."""
        if self.block.inject is None:
            return None
        if self.block.cell_norm:  # P's normalized weight from its parameters now, as the block's forward does
            reset_norm(self.block.inject, power=False)
        dtype = self._step_dtype(x.device)
        if dtype is None:
            return self.block.inject(x)
        with torch.autocast(x.device.type, dtype=dtype):
            return self.block.inject(x).to(x.dtype)

    def _step_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype of a training step's block under the current grad mode (None: float32)."""
        return autocast_dtype(self.cfg.autocast, device) if self.training and torch.is_grad_enabled() else None

    def z_init(self, x: Tensor) -> Tensor:
        if self.cfg.z0 == "zeros":
            return torch.zeros_like(x)
        if self.cfg.z0 == "input":
            return x
        g = torch.Generator(device=x.device).manual_seed(self.cfg.z0_seed)
        return torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)

    def cell(self, x: Tensor, segments: Tensor | None = None):
        """f(., x) as a solver sees it: (B, T, d) -> (B, T, d), or on a sub-batch `idx`
        (segments: packed strings' ids (B, T), deqloop.packing; their attention mask is built
        here, once for the solve).

        P x, the same at every iteration, is computed once per grad mode and train / eval mode
        (a solve runs its no-gradient and its differentiated iterations in different precisions)
        and reused, which saves a d x d matmul per iteration, forward and backward. A cell belongs
        to one solve: build a new one after the weights change."""
        injections: dict[tuple[bool, bool], Tensor | None] = {}
        mask = self.window_mask(segments)

        def f(z: Tensor, idx: Tensor | None = None) -> Tensor:
            if idx is not None and idx.numel() == x.shape[0]:
                idx = None  # every sample active (the loop's rows stay in order): no gather of x
            key = (self.training, torch.is_grad_enabled())
            if key not in injections:
                injections[key] = self.injection(x)
            u = injections[key]
            if idx is None:
                return self.f(z, x, None, u, mask)
            return self.f(z, x[idx], idx, None if u is None else u[idx], None if mask is None else mask[idx])

        return f

    def head_logits(self, z: Tensor) -> Tensor:  # (B, T, d) -> (B, T, n_classes)
        return self.head(self.ln_head(z))

    def window_mask(self, segments: Tensor | None) -> Tensor | None:
        """The attention's mask (B, 1, T, W) of packed strings' ids `segments` (None: None), for `f`."""
        return None if segments is None else self.block.attn.window_mask(segments)

    @property
    def packable(self) -> bool:
        """Whether strings of a padded batch can be packed end to end (deqloop.packing) with the same
        scored outputs: causal local attention and no absolute positions, so a position depends only
        on its own string's earlier positions, wherever in a row the string sits."""
        return self.cfg.window is not None and self.cfg.causal and self.pos is None

    def forward(self, tokens: Tensor, solve: SolveConfig, *, max_iter: int | None = None,
                tol: float | None = None, snapshots: tuple[int, ...] = ()) -> tuple[Tensor, SolverResult]:
        """Logits at the fixed point (B, T, n_classes) and the forward solver's result.

        Differentiable by solve.gradient when gradients are enabled. What training adds on top
        (the loss along the loop, the progressive term, a random no-gradient prefix) is in
        deqloop.objective. snapshots: budgets below max_iter whose results the solve also returns
        (SolverResult.snapshots; without gradients only), for `head_logits(snapshot.z)`.
        """
        x = self.embed_input(tokens)
        z, result = self.solve(x, self.z_init(x), solve, max_iter=max_iter, tol=tol, snapshots=snapshots)
        return self.head_logits(z), result

    def solve(self, x: Tensor, z0: Tensor, solve: SolveConfig, *, max_iter: int | None = None,
              tol: float | None = None, detach: int = 0,
              on_iterate: Callable[[int, Tensor], None] | None = None,
              generator: torch.Generator | None = None,
              snapshots: tuple[int, ...] = (), segments: Tensor | None = None) -> tuple[Tensor, SolverResult]:
        """The fixed point of f(., x) from z0, with its gradient attached (solvers.implicit).

        max_iter, tol: the forward budget and tolerance instead of solve's; with the unroll
        gradient, exactly max_iter iterations, the first `detach` of them without gradient, and
        `on_iterate(i, z_i)` called on each differentiated iterate. generator: the dropout masks'
        (training with dropout only). snapshots: see `forward`. segments: packed strings' ids
        (B, T) of a packed training batch (deqloop.packing).
        """
        self.block.start_solve(generator)
        # subbatch: f on the still-active samples only (the cell treats samples independently), so
        # a batch whose samples converge at different times stops paying for the finished ones
        options = {"subbatch": True, **solve.forward_options(max_iter, tol)}
        if snapshots:
            if torch.is_grad_enabled():
                raise ValueError("snapshots are for evaluation: run the solve under torch.no_grad()")
            options["snapshots"] = tuple(snapshots)
        self.backward_result = None  # this solve's adjoint solve, recorded by loss.backward()
        grad = solve.gradient
        return fixed_point(
            self.cell(x, segments), z0, solver=solve.solver, solver_options=options, grad=grad,
            b_solver=solve.b_solver, b_solver_options={"max_iter": solve.b_max_iter, "tol": solve.b_tol},
            phantom_steps=solve.phantom_steps, unroll_steps=options["max_iter"], unroll_detach=detach,
            on_iterate=on_iterate, on_backward=self._record_backward if grad == "ift" else None,
        )

    def _record_backward(self, result: SolverResult) -> None:
        self.backward_result = result


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 matmuls natively (AVX512-BF16 or AMX, as oneDNN sees it)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def bf16_is_native(device: torch.device) -> bool:
    """Whether bfloat16 matmuls on `device` are native, so faster than float32 (a CPU that emulates
    them ran the chess training step 17x slower than float32: docs/TRAINING.md)."""
    if device.type == "cpu":
        return cpu_has_bf16()
    if device.type == "cuda":
        return _cuda_has_bf16(device.index if device.index is not None else torch.cuda.current_device())
    return False


@functools.cache
def _cuda_has_bf16(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)  # Ampere and newer


def autocast_dtype(setting: str | None, device: torch.device) -> torch.dtype | None:
    """The dtype a training step's block runs in under ModelConfig.autocast `setting` on `device`
    (None: float32). "auto" is bf16 only where `device` runs it natively."""
    if setting == "bf16" or (setting == "auto" and bf16_is_native(device)):
        return torch.bfloat16
    return None


def autocast_note(cfg: ModelConfig, device: torch.device) -> tuple[str, str] | None:
    """("warning" | "note", one line) on what `cfg.autocast` does on `device`, or None where there
    is nothing to say: bf16 on a CPU that emulates it (oneDNN converts every matmul's operands,
    so the step is slower than float32) warns; auto says which precision it chose."""
    if cfg.autocast == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        return ("warning", "--autocast bf16 on a CPU without native bfloat16 (AVX512-BF16 / AMX) is emulated and "
                           "slower than float32; --autocast none or auto trains in float32 here")
    if cfg.autocast == "auto":
        if autocast_dtype("auto", device) is not None:
            return ("note", "autocast auto: training steps run the block's matmuls in bfloat16 "
                            f"(native on this {device.type})")
        return ("note", f"autocast auto: training in float32 (this {device.type} has no native bfloat16; "
                        "a step takes longer than on one that has)")
    return None


def task_configs(task, model: dict | None = None, solve: dict | None = None,
                 preset: str | None = None) -> tuple[ModelConfig, SolveConfig]:
    """The configs of a model for `task` (a tasks.Task): the given fields, else the task's `preset`
    (Task.presets), else its model_defaults / solve_defaults, else the dataclass defaults. The
    forward solver's options start from the task's for that solver (Task.solver_options)."""
    recipe = task.recipe(preset)
    model_cfg = ModelConfig(vocab_size=task.vocab_size, n_classes=task.n_classes,
                            **{**recipe["model"], **(model or {})})
    solve_fields = {**recipe["solve"], **(solve or {})}
    task_options = task.solver_options.get(solve_fields.get("solver", SolveConfig.solver), {})
    if task_options:
        solve_fields["solver_options"] = {**task_options, **(solve_fields.get("solver_options") or {})}
    return model_cfg, SolveConfig(**solve_fields)


def build_model(cfg: ModelConfig, seed: int) -> LoopedTransformer:
    """A model whose initial weights depend on `seed` only (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LoopedTransformer(cfg)
