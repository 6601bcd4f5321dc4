"""Regional compilation: `torch.compile` each repeated block of a model in place.

A whole 3.9 B-parameter VLM compiled as one graph (BLIP-2 Flan-T5-XL) had not finished its first step after
4.5 minutes on an H200 (issue 18). The blocks of a stack (transformer layers, vision stages) run the same code,
so dynamo traces one block per distinct signature and reuses its graph for the others (since torch 2.5 the
parameters of inlined modules are graph inputs, not constants): compile time is that of a few blocks.

`Module.compile` swaps only the module's call path, so parameter names, state dicts, hooks and vlpet's PET
wrappers (which sit inside the blocks and are compiled with them) are unchanged; the code between blocks
(embeddings, image-token merge, loss) stays eager. Works on any model: a PEFT-wrapped one too.
"""

from __future__ import annotations

from torch import nn

__all__ = ["repeated_blocks", "compile_blocks", "image_parts"]


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost repeated blocks: the children of every `nn.ModuleList` that holds two or more modules of one
    class (T5's `block`, BART's `layers`, a ViT's `layers`, Florence-2's DaViT `convs`), in module order; a block's
    own inner lists are part of it. A list of lists (DaViT's `blocks`: one list per stage, iterated, never called)
    gives the modules of its inner lists."""
    found: list[tuple[str, nn.Module]] = []

    def callables(module: nn.Module, path: str):
        if isinstance(module, nn.ModuleList):
            for i, child in enumerate(module):
                yield from callables(child, f"{path}.{i}")
        else:
            yield path, module

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.ModuleList) and len(child) >= 2 and len({type(c) for c in child}) == 1:
                found.extend(callables(child, path))
            else:
                visit(child, path)

    visit(model, "")
    return found


def image_parts(model: nn.Module) -> tuple[str, ...]:
    """The module paths of a vlpet VLM's frozen image path (`vlpet.backbones.vlm.FROZEN_FEATURE_MODULES`: what
    `frozen_image_features` runs, images in, nothing else), else ()."""
    from .backbones.vlm import FROZEN_FEATURE_MODULES

    arch = getattr(model, "arch", None)
    if arch is None or not getattr(model, "native_inputs", False):
        return ()
    return tuple(f"backbone.{part}" for part in FROZEN_FEATURE_MODULES.get(arch.image_path, ()))


def compile_blocks(model: nn.Module, mode: str | None = None, backend: str = "inductor",
                   dynamic: bool | None = None, static_under: tuple[str, ...] | None = None) -> list[str]:
    """`torch.compile` every block of `repeated_blocks(model)` in place; returns their names.

    mode: torch.compile's (None = default; "reduce-overhead" adds CUDA graphs: call
    `torch.compiler.cudagraph_mark_step_begin()` before each training step, and run the blocks with gradients
    only). static_under: module paths whose blocks compile with static shapes (default: a vlpet VLM's image path,
    `image_parts`). Set trainability (and `vlpet.recompute.set_recompute`) first: a compiled block reads its
    modules as they are when it is traced.
    """
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no repeated blocks (no nn.ModuleList of two or more modules of "
                         f"one class) to compile; use torch.compile(model)")
    import torch._dynamo

    # The blocks of one class share one code object, and each of its signatures (a DaViT stage's shapes, a batch
    # size of the static image path, grad mode on in training and off in the feature cache and evaluation) is one
    # cache entry of it: dynamo's default limit of 8 sent Florence-2-large's stem convs (4 shapes x 2 grad modes,
    # then a ninth) back to eager on an H200. Past the limit dynamo warns and runs the block eagerly.
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    setattr(config, limit, max(getattr(config, limit), 256))
    # An image path sees one image size, so only its batch varies: static shapes cost a graph per batch size.
    # Dynamic ones broke there: inductor's range analysis of DaViT's window padding raised "ValueRangeError:
    # Invalid ranges [0:-1]" (torch 2.13, tiny Florence-2, the validation batch after the training ones).
    static_under = image_parts(model) if static_under is None else static_under
    for name, block in blocks:
        static = any(name == p or name.startswith(p + ".") for p in static_under)
        block.compile(mode=mode, backend=backend, dynamic=False if static else dynamic)
    return [name for name, _ in blocks]
