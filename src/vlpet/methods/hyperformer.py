"""HyperFormer adapters (Mahabadi et al. 2021) as the VL-Adapter baseline builds them (spec §4.6).

Per stack (encoder, decoder): e = LN(MLP([task_emb ; layer_emb])) ∈ R^8, shared by every block of a
layer; per block type (self-attn, FFN, and cross-attn in the decoder) four linear generators map e
to W_down [r, D], b_down [r], W_up [D, r], b_up [D]; the adapter is h + W_up·gelu_new(W_down·h + b_down) + b_up.
Task embeddings (one 512-d vector per task, N(0, 1)) are shared by both stacks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..granularity import gelu_new


class TaskEmbeddings(nn.Module):
    def __init__(self, tasks, dim: int):
        super().__init__()
        self.tasks = tuple(tasks)
        self.embeddings = nn.ParameterDict({t: nn.Parameter(torch.randn(dim)) for t in self.tasks})

    def forward(self, task: str) -> torch.Tensor:
        if task not in self.embeddings:
            raise ConfigError(f"hyperformer: task {task!r} has no task embedding; known: {', '.join(self.tasks)}")
        return self.embeddings[task]


class _Generator(nn.Module):
    def __init__(self, e_dim: int, out_rows: int, out_cols: int):
        super().__init__()
        self.shape = (out_rows, out_cols)
        self.weight_generator = nn.Linear(e_dim, out_rows * out_cols)
        self.bias_generator = nn.Linear(e_dim, out_rows)

    def forward(self, e):
        return self.weight_generator(e).view(self.shape), self.bias_generator(e)


class HyperNetController(nn.Module):
    """One per stack: layer-id embeddings, the task projector and one generator pair per block type."""

    def __init__(self, n_layers: int, block_types, d_model: int, r: int, task_dim: int, hidden: int, proj: int):
        super().__init__()
        self.layer_id_embeddings = nn.Embedding(n_layers, task_dim)
        self.task_hypernet = nn.Sequential(nn.Linear(2 * task_dim, hidden), nn.ReLU(), nn.Linear(hidden, proj))
        self.layer_norm = nn.LayerNorm(proj, eps=1e-6)
        self.blocks = nn.ModuleDict({
            b: nn.ModuleDict({"down": _Generator(proj, r, d_model), "up": _Generator(proj, d_model, r)})
            for b in block_types
        })

    def embedding(self, task_emb: torch.Tensor, layer: int) -> torch.Tensor:
        layer_emb = self.layer_id_embeddings.weight[layer]
        return self.layer_norm(self.task_hypernet(torch.cat([task_emb, layer_emb])))


class HyperAdapter(nn.Module):
    """The ΔH of one block of one layer; holds references (not sub-modules) to its shared controller."""

    def __init__(self, controller: HyperNetController, task_embeddings: TaskEmbeddings, layer: int, block: str,
                 ctx):
        super().__init__()
        self._refs = [controller, task_embeddings, ctx]
        self.layer, self.block = layer, block

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        controller, tasks, ctx = self._refs
        task = ctx.task
        if task is None:
            raise ConfigError("hyperformer: no task given; pass task=... to forward()/generate()")
        e = controller.embedding(tasks(task), self.layer)
        gens = controller.blocks[self.block]
        w_down, b_down = gens["down"](e)
        w_up, b_up = gens["up"](e)
        dt = h.dtype
        return F.linear(gelu_new(F.linear(h, w_down.to(dt), b_down.to(dt))), w_up.to(dt), b_up.to(dt))
