"""The joint [prompt ; text ; visual] encoder input on an unmodified HF encoder (spec §3.3).

The VL model passes the whole joint sequence as `inputs_embeds`; a few thin wrappers, placed by the
architecture table, keep what must act on text only to the text:
- BART's learned positions are added to the text tokens only (prompts and visual tokens get none);
- BART's `layernorm_embedding` normalises prompts + text, not the visual tokens;
- T5's relative position bias is non-zero only among prompt + text tokens.
The spans come from a `JointContext` that the VL model fills in before each encoder call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class JointContext:
    prompt_len: int = 0
    text_len: int | None = None  # None: no VL call in progress, wrappers pass through
    mask: torch.Tensor | None = None  # [B, N] joint attention mask (for the masked-mean option)
    task: str | None = None  # the batch's task (HyperFormer's task embedding)

    @property
    def active(self) -> bool:
        return self.text_len is not None


class TextOnlyPositions(nn.Module):
    """Learned positions for the text tokens only; zeros at prompt and visual positions."""

    def __init__(self, base_layer: nn.Module, ctx: JointContext):
        super().__init__()
        self.base_layer = base_layer
        self.ctx = [ctx]  # a list keeps the context out of the module tree

    def forward(self, first, *args, **kwargs):
        # Called with ids / an embedding slice ([B, N, ...]) or a shape ((B, N)) depending on the
        # architecture; returns [.., N, D].
        ctx = self.ctx[0]
        if not ctx.active:
            return self.base_layer(first, *args, **kwargs)
        p, t = ctx.prompt_len, ctx.text_len
        n = first.shape[1] if isinstance(first, torch.Tensor) else first[1]
        # Look up positions 0..t-1 only (as the official model does), so a position table that holds
        # the text but not text + visual tokens still works; prompt and visual rows get zeros.
        if isinstance(first, torch.Tensor):
            first = first.narrow(1, 0, t)
        else:
            first = type(first)((first[0], t, *first[2:]))
        pos = self.base_layer(first, *args, **kwargs)
        return nn.functional.pad(pos, (0, 0, p, n - p - t))


class TextOnlyNorm(nn.Module):
    """LayerNorm over [prompt ; text]; visual tokens pass through unchanged."""

    def __init__(self, base_layer: nn.Module, ctx: JointContext):
        super().__init__()
        self.base_layer = base_layer
        self.ctx = [ctx]

    def forward(self, x):
        ctx = self.ctx[0]
        if not ctx.active:
            return self.base_layer(x)
        e = ctx.prompt_len + ctx.text_len
        return torch.cat([self.base_layer(x[:, :e]), x[:, e:]], dim=1)


class TextOnlyRelativeBias(nn.Module):
    """Wraps T5's `relative_attention_bias` embedding: bucket ids [q, k] -> bias [q, k, heads],
    zeroed wherever the query or the key is a visual token."""

    def __init__(self, base_layer: nn.Embedding, ctx: JointContext):
        super().__init__()
        self.base_layer = base_layer
        self.ctx = [ctx]

    @property
    def weight(self):  # T5Attention.compute_bias reads `.weight.device`
        return self.base_layer.weight

    def forward(self, buckets: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx[0]
        values = self.base_layer(buckets)
        if not ctx.active:
            return values
        e = ctx.prompt_len + ctx.text_len
        q, k = buckets.shape[-2:]
        keep_q = torch.arange(q, device=values.device) < e
        keep_k = torch.arange(k, device=values.device) < e
        keep = (keep_q[:, None] & keep_k[None, :]).unsqueeze(-1)
        return values * keep.to(values.dtype)
