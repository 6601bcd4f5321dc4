"""Which tensors does torch.compile's min-cut partitioner keep for the backward? (issue 19)

One compiled VL-BART train step per method on the CPU (bf16 autocast, frozen weights in bf16, train
mode), as benchmarks/pet_profile.py `profile_config` runs it. Inductor's own partition function
(its joint-graph passes, then `min_cut_rematerialization_partition(compiler="inductor")`) is wrapped
to record, per compiled graph, the forward nodes the backward reads and, from the min-cut flow graph,
why each could not be recomputed. `--backend aot` (default) runs that partition inside
`aot_autograd` with Inductor's decompositions but no code generation (the graphs run eagerly: fast
on the CPU); `--backend inductor` is the real `torch.compile(backend="inductor")` (C++ codegen, slow).

Prints, per method, the saved tensors by (shape, dtype) and those of shape [tokens, d_model] /
[batch, seq, d_model] with their op, module path and reason, then the multiset difference against
the first method (the floor).

  OMP_NUM_THREADS=1 python benchmarks/saved_tensors.py                      # tiny BART, batch 4
  OMP_NUM_THREADS=1 python benchmarks/saved_tensors.py --size base --batch 8  # bart-base dims, 6+6 layers
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench as B  # noqa: E402

METHODS = ["floor", "vl-pet-large", "vl-pet-large+rc"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["tiny", "base"], default="tiny",
                   help="tiny: _bench.TINY_OVERRIDES (d 64, 2+2 layers); base: the bart-base config (d 768, 6+6)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--methods", nargs="+", default=METHODS, help="'+rc': recompute on (default: %(default)s)")
    p.add_argument("--backend", choices=["aot", "inductor"], default="aot")
    p.add_argument("--all", action="store_true", help="list every saved tensor, not only the d_model-wide ones")
    return p.parse_args(argv)


class Recorder:
    """Wraps inductor's min-cut partition: per graph, [(node, reason)] of the saved forward values."""

    def __init__(self):
        self.graphs: list[list[tuple[torch.fx.Node, str]]] = []
        self.attn: set[str] = set()

    def install(self):
        import networkx as nx
        import torch._functorch.partitioners as P
        import torch._inductor.compile_fx as CF

        orig_cut, orig_part, last = nx.minimum_cut, CF.min_cut_rematerialization_partition, {}

        def cut(g, *a, **k):  # keep the flow graph: its edges carry the partitioner's reasons
            last["g"] = g
            return orig_cut(g, *a, **k)

        def part(joint, inputs, **kw):
            fw, bw = orig_part(joint, inputs, **kw)
            g = last.pop("g", None)
            names = {n.name: n for n in fw.graph.nodes}
            saved = []
            for ph in bw.graph.find_nodes(op="placeholder"):
                if ph.name.startswith("tangents") or ph.name not in names:
                    continue
                node = names[ph.name]
                if node.op == "placeholder":
                    why = "graph input"
                elif g is not None and g.has_edge("source", node.name + "_in"):
                    why = g["source"][node.name + "_in"].get("reason", "cannot recompute")
                elif g is not None and g.has_edge(node.name + "_out", "sink"):
                    why = "read by the backward; saving it is the min cut"
                else:
                    why = "min cut (cheaper than its inputs)"
                saved.append((node, why))
            self.graphs.append(saved)
            self.attn |= {str(n.target) for n in fw.graph.nodes if "scaled_dot" in str(n.target)}
            return fw, bw

        nx.minimum_cut = cut
        P.nx = nx
        CF.min_cut_rematerialization_partition = part

    def backend(self, kind: str):
        if kind == "inductor":
            return "inductor"
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.aot_autograd import make_boxed_func
        from torch._inductor.compile_fx import partition_fn
        from torch._inductor.decomposition import select_decomp_table

        from torch._guards import detect_fake_mode
        from torch._inductor.virtualized import V

        def part(gm, inputs, **kw):  # as compile_fx calls it: with the fake mode installed
            with V.set_fake_mode(detect_fake_mode(inputs)):
                return partition_fn(gm, inputs, **kw)

        nop = lambda gm, _inputs: make_boxed_func(gm.forward)  # noqa: E731
        return aot_autograd(fw_compiler=nop, bw_compiler=nop, partition_fn=part,
                            decompositions=select_decomp_table())


def origin(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else "?"
    for prefix in ("L['self'].", "L['self']", "L['fn'].", "self."):
        path = path.replace(prefix, "")
    tag = " [ckpt]" if node.meta.get("recompute") is not None or node.meta.get("ac_graph_id") is not None else ""
    frames = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines()]
    src = ""
    for i, ln in enumerate(frames):  # the innermost frame: 'File "...", line N, in fn' and its code line
        if ln.startswith("File "):
            f, rest = ln[6:].split('", line ', 1)
            src = f"{Path(f).name}:{rest} | {frames[i + 1] if i + 1 < len(frames) else ''}"
    return f"{path}{tag} :: {src}"


def build(method: str, size: str):
    from vlpet.recompute import set_recompute

    base, suffixes = B.split_suffixes(method)
    rc = "rc" in suffixes
    if size == "tiny":
        m = B.build_vl("bart-base", base, tiny=True)
    else:
        from transformers import AutoModelForSeq2SeqLM
        from vlpet.model import VisualConfig, VLModel

        cfg = B.hf_config("bart-base", tiny=False)
        cfg.vocab_size = 2000  # the LM head only (not a [tokens, d_model] tensor): small to keep the CPU fast
        with B.fork_rng(0):
            hf = AutoModelForSeq2SeqLM.from_config(cfg)
        m = VLModel(hf, B.method_config(base, "bart-base"), VisualConfig.for_task(), backbone_name="bart-base-small-vocab",
                    vocab_rows=cfg.vocab_size + 200, seed=0)
    if rc:
        set_recompute(m, True)
    m.set_frozen_dtype(torch.bfloat16)
    return m.train()


def step(method: str, args, rec: Recorder) -> list[list[tuple[torch.fx.Node, str]]]:
    from vlpet.train.losses import task_loss

    torch._dynamo.reset()
    rec.graphs = []
    m = build(method, args.size)
    vocab = min(m.backbone.get_input_embeddings().num_embeddings, B.TOKEN_HIGH)
    b = B.random_batch(args.batch, torch.device("cpu"), vocab)
    dec = m.backbone.prepare_decoder_input_ids_from_labels(labels=b["labels"])
    fwd = torch.compile(m, backend=rec.backend(args.backend))
    loss_fn = torch.compile(task_loss, backend=rec.backend(args.backend))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fwd(b["input_ids"], b["attention_mask"], vis_feats=b["vis_feats"], decoder_input_ids=dec, task="vqa")
        loss = loss_fn(out.logits, b["labels"])
    loss.backward()
    return rec.graphs


def root(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor whose storage a saved view shares (the runtime inventory counts storages)."""
    while node.op == "call_function" and isinstance(node.args[0], torch.fx.Node) and getattr(
            node.target, "is_view", False):
        node = node.args[0]
    return node


def shape_of(node) -> tuple:
    v = node.meta.get("val")
    return (tuple(v.shape), str(v.dtype).replace("torch.", "")) if isinstance(v, torch.Tensor) else ((), type(v).__name__)


def main(argv=None):
    args = parse(argv)
    torch.set_num_threads(1)
    rec = Recorder()
    rec.install()
    d = B.hf_config("bart-base", tiny=args.size == "tiny").d_model
    tok = args.batch * (B.TEXT_LEN + 36)
    wide = {(tok, d), (args.batch, B.TEXT_LEN + 36, d)}
    counts = {}
    for method in args.methods:
        graphs = step(method, args, rec)
        firsts = {}  # storage root -> the first saved view of it (its shape labels the storage, as in pet_profile)
        for g in graphs:
            for n, _ in g:
                firsts.setdefault(root(n), n)
        counts[method] = collections.Counter(shape_of(n) for n in firsts.values())
        print(f"\n=== {method}: {len(graphs)} graph(s), {sum(map(len, graphs))} saved values, {len(firsts)} storages")
        for gi, g in enumerate(graphs):
            for n, why in g:
                shp = shape_of(n)
                if args.all or shp[0] in wide:
                    alias = "" if firsts.get(root(n)) is n else f" (same storage as {firsts[root(n)].name})"
                    print(f"  g{gi} {n.name + alias:<28} {str(shp[0]):<16} {shp[1]:<9} {n.target}  <- {origin(n)}  | {why}")
    print("\nattention op(s):", sorted(rec.attn))
    first = args.methods[0]
    for method in args.methods[1:]:
        diff = counts[method] - counts[first]
        less = counts[first] - counts[method]
        print(f"\n--- {method} minus {first}: more {dict(diff)}; fewer {dict(less)}")


if __name__ == "__main__":
    main()
