"""The VL-T5 / VL-BART visual embedding (spec §3.2) and the grid pooling of spec §3.1 / §3.8.

v_i = LN_f(W_f f_i + b_f) + LN_p(W_p [x1, x2, y1, y2, area] + b_p) + E_img[m] + E_tok[V - 1 - i]

E_tok is the backbone's shared word-embedding matrix, read at forward time (so object i uses the
row of <vis_extra_id_i>); those rows are frozen, only E_img (`img_order_embedding`) trains.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ShapeError


class RMSNorm(nn.Module):
    """T5LayerNorm semantics: scale only, no mean subtraction, no bias, computed in fp32."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        y = x.float() * torch.rsqrt(var + self.eps)
        return self.weight * y.to(self.weight.dtype) if self.weight.dtype in (torch.float16, torch.bfloat16) \
            else (self.weight * y).to(x.dtype)


def make_norm(kind: str, d: int, eps: float) -> nn.Module:
    return RMSNorm(d, eps) if kind == "rms" else nn.LayerNorm(d, eps=eps)


class VisualEmbedding(nn.Module):
    def __init__(self, feat_dim: int, d_model: int, norm: str = "layernorm", eps: float = 1e-5,
                 n_images: int = 2, pos_dim: int = 5):
        super().__init__()
        self.feat_dim = feat_dim
        self.feat_embedding = nn.Sequential(nn.Linear(feat_dim, d_model), make_norm(norm, d_model, eps))
        self.absolute_vis_pos_embedding = nn.Sequential(nn.Linear(pos_dim, d_model), make_norm(norm, d_model, eps))
        self.img_order_embedding = nn.Embedding(n_images, d_model)

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor | None, img_order_ids: torch.Tensor,
                obj_order_ids: torch.Tensor, token_embedding: torch.Tensor) -> torch.Tensor:
        """feats [B, V, F]; boxes [B, V, 4] or None (zeros); ids [V]; token_embedding [rows, D]."""
        f = self.feat_embedding(feats)
        if boxes is None:
            # Zero boxes (the official loaders' only input): the position term is LN_p(b_p), a constant.
            pos_in = torch.zeros(1, 1, 5, dtype=f.dtype, device=f.device)
        else:
            area = (boxes[..., 3] - boxes[..., 2]) * (boxes[..., 1] - boxes[..., 0])
            pos_in = torch.cat([boxes, area.unsqueeze(-1)], dim=-1).to(f.dtype)
        p = self.absolute_vis_pos_embedding(pos_in)
        rows = token_embedding.shape[0]
        obj = F.embedding(rows - 1 - obj_order_ids, token_embedding).to(f.dtype)
        img = self.img_order_embedding(img_order_ids).to(f.dtype)
        return f + p + (img + obj).unsqueeze(0)


def _uniform_windows(side: int, out_side: int) -> tuple[int, int] | None:
    """(kernel, stride) when adaptive pooling side -> out_side uses equal, evenly spaced windows
    (7 -> 6: kernel 2, stride 1; 7 -> 3: kernel 3, stride 2), else None."""
    starts = [(i * side) // out_side for i in range(out_side)]
    ends = [-((-(i + 1) * side) // out_side) for i in range(out_side)]
    sizes = {e - b for b, e in zip(starts, ends)}
    strides = {b - a for a, b in zip(starts, starts[1:])} or {1}
    if len(sizes) == 1 and len(strides) == 1:
        return sizes.pop(), strides.pop()
    return None


def pool_grid(feats: torch.Tensor, out_side: int) -> torch.Tensor:
    """[N, S*S, F] grid (row-major) -> [N, out_side², F] by adaptive max pooling (7x7 -> 6x6).

    When the adaptive windows are uniform (7 -> 6 and 7 -> 3 are) the max is taken over k² strided
    views in the features-last layout: the same numbers as `adaptive_max_pool2d`, without its two
    transposes and its slow kernel (2.8 ms of a 80 ms H100 step at batch 500, benchmarks/README.md).
    """
    n, v, fdim = feats.shape
    side = math.isqrt(v)
    if side * side != v:
        raise ShapeError(f"vis_feats: {v} visual tokens is not a square grid; cannot pool to {out_side}x{out_side}")
    if side == out_side:
        return feats
    uniform = _uniform_windows(side, out_side)
    if uniform is None:
        grid = feats.transpose(1, 2).reshape(n, fdim, side, side)
        pooled = F.adaptive_max_pool2d(grid, (out_side, out_side))
        return pooled.flatten(2).transpose(1, 2)
    k, st = uniform
    grid = feats.reshape(n, side, side, fdim)
    span = st * (out_side - 1) + 1
    out = None
    for a in range(k):
        for b in range(k):
            view = grid[:, a:a + span:st, b:b + span:st]
            out = view if out is None else torch.maximum(out, view)
    return out.reshape(n, out_side * out_side, fdim)
