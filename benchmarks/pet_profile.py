"""Where a PET method's step time and memory go, against vlpet's frozen floor (issue 19).

    python benchmarks/pet_profile.py --compile          # VL-BART-base (500) and VL-T5-base (300), bf16, GPU
    python benchmarks/pet_profile.py --device cpu --tiny # CPU smoke test of the same code path

For each (backbone, method) of the same run, with `floor` first, one config is built as
`benchmarks/train_step.py` builds it (frozen backbone bf16, trainable tensors fp32, bf16 autocast,
loss path decoder-ids; `--compile`: torch.compile mode default, i.e. no CUDA graphs, so that every
kernel can be attributed to the op that launched it) and after warm-up it records:

- **time**: the median step (CUDA events) and a torch.profiler pass over a few steps, with every GPU
  kernel's time put in one category by its name (GEMM, attention, Triton fused, aten element-wise,
  reductions, optimizer, copies) and the GEMMs split by their shapes into the PET module's own
  projections (one dimension is a PET bottleneck width r) and the backbone's;
- **memory** (from the caching allocator, exact): the steady state before a step (weights, AdamW
  state, inputs), what the forward leaves allocated for the backward (`held after forward`), the
  step's peak, and the inventory of tensors saved for the backward
  (`torch.autograd.graph.saved_tensors_hooks`, distinct storages, parameters excluded) grouped by
  shape, so the [tokens x D] tensors a PET module keeps are counted one by one.

Every figure is printed next to the floor's and as the difference from it: the profile that says
where the time and memory above the floor go. JSON to --out / benchmarks/results/.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import _bench as B  # noqa: E402
import train_step as TS  # noqa: E402

MM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
# kernel-name fragments -> category; the first match wins: inductor's kernels first (their names spell the
# fused ops, e.g. "..._attention_backward_0"), the gradient norm's foreach kernel before the optimizer's, GEMM
# before the element-wise fragments (cuBLAS names can mention "elementwise" in their epilogue)
CATEGORIES = (
    ("triton fused", ("triton_",)),
    ("gradient norm", ("lpnorm", "norm_kernel")),
    ("optimizer", ("multi_tensor", "fused_adam", "adamw", "fusedadam")),
    ("attention", ("fmha", "flash", "attention", "cutlass_sm80_attn", "pytorch_flash")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_", "sm80_", "wgmma")),
    ("aten reduction", ("reduce_kernel", "softmax", "norm", "cross_entropy", "nll_loss", "logsoftmax")),
    ("aten element-wise", ("elementwise", "vectorized", "unrolled", "index", "scatter", "gather", "cat", "fill")),
    ("copy / memset", ("memcpy", "memset", "copy")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    for cat, frags in CATEGORIES:
        if any(f in low for f in frags):
            return cat
    return "other"


def pet_widths(model) -> set[int]:
    """Bottleneck widths of the PET modules (adapter r, large gate r_g, value adapter r_dec)."""
    from vlpet.granularity import LargeGate
    from vlpet.methods.adapter import Bottleneck

    return {m.down.out_features for m in model.modules() if isinstance(m, (Bottleneck, LargeGate))}


def backbone_dims(model) -> set[int]:
    """Every size of the frozen backbone's weight matrices (a GEMM touching only these is the backbone's);
    the PET modules sit inside the backbone, so only frozen tensors count."""
    return {d for p in model.backbone.parameters() if p.dim() == 2 and not p.requires_grad for d in p.shape}


def classify_gemm(shapes, pet: set[int], frozen: set[int]) -> str:
    dims = {d for s in shapes if s for d in s}
    return "gemm: PET projections" if dims & (pet - frozen) else "gemm: backbone"


class SavedInventory:
    """saved_tensors_hooks that count the distinct storages saved for the backward, by shape and dtype."""

    def __init__(self, params: set[int]):
        self.params = params
        self.seen: set[int] = set()
        self.by_shape: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def pack(self, t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.params and ptr not in self.seen:
                self.seen.add(ptr)
                row = self.by_shape[f"{list(t.shape)} {str(t.dtype).replace('torch.', '')}"]
                row[0] += 1
                row[1] += t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def table(self, top: int = 12) -> list[dict]:
        rows = sorted(self.by_shape.items(), key=lambda kv: -kv[1][1])
        return [{"shape dtype": k, "count": c, "mib": round(b / 2**20, 2)} for k, (c, b) in rows[:top]]

    def total_bytes(self) -> int:
        return sum(b for _, b in self.by_shape.values())


def state_bytes(model, opt) -> dict:
    seen, frozen, trainable = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel() * p.element_size()
        else:
            frozen += p.numel() * p.element_size()
    opt_state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                    if torch.is_tensor(t))
    return {"frozen_weights": frozen, "trainable_weights": trainable, "gradients": trainable,
            "adamw_state": opt_state}


def profile_config(backbone: str, method: str, args, device) -> dict:
    from vlpet.train.losses import task_loss

    model, make_opt, _ = TS.build(backbone, method, args, device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    TS.apply_frozen_dtype(model, False, "auto", precision)
    opt = make_opt()
    bsz = args.batch or (4 if args.tiny else B.PAPER_BATCH[backbone])
    batch = B.random_batch(bsz, device, min(TS.vocab_of(model, False), B.TOKEN_HIGH), seed=args.seed)
    params = [p for g in opt.param_groups for p in g["params"]]
    fwd = torch.compile(model) if args.compile else model
    loss_fn = torch.compile(task_loss) if args.compile else task_loss
    dec = model.backbone.prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    pet = pet_widths(model)

    def forward():
        with B.autocast(device, precision):
            out = fwd(batch["input_ids"], batch["attention_mask"], vis_feats=batch["vis_feats"],
                      decoder_input_ids=dec, task="vqa")
            return loss_fn(out.logits, batch["labels"])

    def rest(loss):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def step():
        rest(forward())

    for _ in range(args.warmup):
        step()
    times, _ = B.time_steps(step, args.steps, device)  # synchronises first

    # memory: steady state, what the forward leaves for the backward, the step's peak
    mem = {}
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = forward()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base
        rest(loss)
        del loss
        torch.cuda.synchronize()
        mem = {"steady_gib": base / 2**30, "held_after_forward_gib": held / 2**30,
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    # inventory of saved tensors (one more step, hooks on; parameters' own storages excluded)
    inv = SavedInventory({p.untyped_storage().data_ptr() for p in model.parameters()})
    with inv.hooks():
        loss = forward()
    rest(loss)
    del loss
    mem["saved_for_backward_gib"] = inv.total_bytes() / 2**30
    mem["saved_by_shape"] = inv.table()
    mem.update({k + "_gib": v / 2**30 for k, v in state_bytes(model, opt).items()})

    # time: profiler over a few steps, kernels by category, GEMMs split by shape
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    n = args.profile_steps
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(n):
            step()
        B.sync(device)
    cats: dict[str, float] = defaultdict(float)
    if device.type == "cuda":
        for e in prof.key_averages():
            if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
                cats[kernel_category(e.key)] += e.self_device_time_total / 1e3 / n
        # the GEMM kernels, split into PET and backbone by the shapes of the op that launched them
        frozen = backbone_dims(model)
        split: dict[str, float] = defaultdict(float)
        for e in prof.events():
            if e.name in MM_OPS and e.device_type == torch.autograd.DeviceType.CPU:
                split[classify_gemm(e.input_shapes, pet, frozen)] += e.device_time_total / 1e3 / n
        gemm_total = cats.pop("gemm", 0.0)
        attributed = sum(split.values())
        for k, v in split.items():
            cats[k] = v * (gemm_total / attributed) if attributed else 0.0  # scaled to the kernels' own total
        if not attributed:
            cats["gemm: backbone"] = gemm_total
    s = B.summarise(times)
    trainable, total = B.param_counts(model)
    rec = {"batch": bsz, "step_ms": s["median"], "kernel_ms": sum(cats.values()),
           "kernels_by_category_ms": dict(sorted(cats.items())), "memory": mem,
           "trainable_percent": 100 * trainable / total, "pet_widths": sorted(pet),
           "compile": args.compile}
    return rec


def report(data: dict) -> str:
    """Per backbone: one column per method and, for each method after `floor`, its difference from it."""
    lines = []
    mkeys = ("steady_gib", "held_after_forward_gib", "peak_gib", "saved_for_backward_gib", "trainable_weights_gib",
             "adamw_state_gib")
    for backbone, per in data["results"].items():
        names = list(per)
        lines += ["", f"## {backbone} (batch {per[names[0]]['batch']}, compile {data['meta']['compile']})", ""]
        cats = sorted({c for r in per.values() for c in r["kernels_by_category_ms"]})
        getters = [("step ms (median, no profiler)", lambda r: r["step_ms"]),
                   ("GPU kernel ms / step (profiled)", lambda r: r["kernel_ms"])]
        getters += [(f"kernels: {c} ms", lambda r, c=c: r["kernels_by_category_ms"].get(c, 0.0)) for c in cats]
        getters += [(k.replace("_gib", " GiB"), lambda r, k=k: r["memory"].get(k)) for k in mkeys]
        head = [""]
        for n in names:
            head += [n] if n == "floor" or "floor" not in per else [n, f"{n} - floor"]
        rows = []
        for label, get in getters:
            row = [label]
            for n in names:
                v = get(per[n])
                row.append(B.rnd(v, 3))
                if n != "floor" and "floor" in per:
                    f = get(per["floor"])
                    row.append(B.rnd(v - f, 3) if v is not None and f is not None else "")
            rows.append(row)
        lines.append(B.md_table(head, rows))
        for name, r in per.items():
            lines += ["", f"saved for the backward by shape, {backbone} {name}:",
                      B.md_table(["shape dtype", "count", "MiB"],
                                 [[x["shape dtype"], x["count"], x["mib"]] for x in r["memory"]["saved_by_shape"]])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", type=B.csv_list, default=["bart-base", "t5-base"])
    p.add_argument("--methods", type=B.csv_list, default=["floor", "vl-pet-large", "vl-pet-large+rc"],
                   help="floor first: the difference column is taken against it")
    p.add_argument("--compile", action="store_true", help="torch.compile, mode default (no CUDA graphs)")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="with --compile: torch._functorch.config.activation_memory_budget (lower recomputes more)")
    p.add_argument("--batch", type=int, default=None, help="default: the paper batch (500 BART, 300 T5)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny models, batch 4: a CPU smoke test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--results-dir", default=None)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.memory_budget is not None:
        if not args.compile:
            p.error("--memory-budget needs --compile (it steers the compiled backward's recomputation)")
        import torch._functorch.config as fconfig

        fconfig.activation_memory_budget = args.memory_budget
    device = B.pick_device(args.device)
    B.cpu_threads_for_tiny(device, args.tiny)
    env = B.environment(device, {**B.configure_tf32(device, True), "compile": args.compile,
                                 "compile_mode": "default", "memory_budget": args.memory_budget, "steps": args.steps, "warmup": args.warmup,
                                 "profile_steps": args.profile_steps, "tiny": args.tiny})
    data = {"benchmark": "pet_profile", "meta": env, "results": {}, "errors": {}}
    writer = B.ResultWriter("pet_profile", env, B.output_folders(args), tag=("-tiny" if args.tiny else "") + args.tag)
    for backbone in args.backbones:
        for method in args.methods:
            t0 = time.perf_counter()
            try:
                rec = profile_config(backbone, method, args, device)
                data["results"].setdefault(backbone, {})[method] = rec
                B.log(f"[ok] {backbone}/{method} ({time.perf_counter() - t0:.0f} s): step {rec['step_ms']:.2f} ms, "
                      f"kernels {rec['kernel_ms']:.2f} ms, mem {rec['memory'].get('peak_gib')}")
            except Exception as exc:  # noqa: BLE001 - one failed config must not lose the others
                data["errors"][f"{backbone}/{method}"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                B.log(f"[error] {backbone}/{method}: {traceback.format_exc()}")
            # the config's model, optimizer and compiled graphs are gone with its frame: free them now
            if args.compile:
                torch._dynamo.reset()
            B.reset_memory(device)  # collects, then empties the CUDA cache
            writer.write(data)
    print(report(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
