"""Regional compilation (vlpet.compile): every repeated block of a tiny Florence-2 / BLIP-2 is found, compiled in
place, and the compiled model gives the eager model's loss and gradients, with the same parameter names; one
graph serves the blocks of a stack. Compiled with dynamo + AOT autograd (aot_eager backend: the inductor backend
needs a C compiler and minutes on the 2-core machine; the H200 runs are in benchmarks/README.md)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from test_vlm import BLIP, FLORENCE, batch, save_vlm, vlm_folders  # noqa: F401 (a fixture)

from vlpet import VLModel
from vlpet.compile import compile_blocks, repeated_blocks

# two layers in each stack (the shared fixtures have one), two DaViT stages of depths 1 and 2
STACKED = {
    "florence2": {**FLORENCE, "vision_config": {**FLORENCE["vision_config"], "depths": [1, 2]},
                  "text_config": {**FLORENCE["text_config"], "encoder_layers": 2, "decoder_layers": 2}},
    "blip2": {**BLIP, "vision_config": {**BLIP["vision_config"], "num_hidden_layers": 2},
              "text_config": {**BLIP["text_config"], "num_layers": 2, "num_decoder_layers": 2}},
}
BLOCKS = {  # what repeated_blocks must find, written from the configs above
    "florence2": {"Florence2VisionConvEmbed": 2, "Florence2VisionBlock": 3, "BartEncoderLayer": 2,
                  "BartDecoderLayer": 2},
    "blip2": {"Blip2EncoderLayer": 2, "Blip2QFormerLayer": 2, "T5Block": 4},
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: save_vlm(kind, cfg, tmp_path_factory.mktemp(kind), seed=3) for kind, cfg in STACKED.items()}


def _loss_and_grads(model, kind):
    inputs, labels = batch(kind)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("kind", sorted(STACKED))
def test_repeated_blocks_are_every_layer_and_vision_block(folders, kind):
    model = VLModel.build(str(folders[kind]), "vl-pet-large", load_tok=False)
    blocks = repeated_blocks(model)
    assert Counter(type(m).__name__ for _, m in blocks) == BLOCKS[kind]
    for name, module in blocks:
        assert model.get_submodule(name) is module


@pytest.mark.parametrize("kind", sorted(STACKED))
def test_compiled_blocks_give_the_eager_loss_and_gradients(folders, kind, one_thread):
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = VLModel.build(str(folders[kind]), "vl-pet-large", load_tok=False).eval()  # eval: no dropout draws
    with torch.no_grad():  # non-zero up-projections, so that every PET module changes the output
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
    names = list(model.state_dict())
    ref = _loss_and_grads(model, kind)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = compile_blocks(model, backend="aot_eager")
        got = _loss_and_grads(model, kind)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert compiled == [n for n, _ in repeated_blocks(model)]
    assert list(model.state_dict()) == names  # in place: the names a checkpoint holds do not change
    assert 0 < graphs < len(compiled)  # the blocks of a stack share a graph
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert got[2].keys() == ref[2].keys()
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("kind", sorted(STACKED))
def test_generate_through_compiled_blocks_equals_eager(folders, kind, one_thread):
    """Evaluation in `vlpet train --compile` generates through the compiled blocks (no gradients, a growing KV
    cache): the same tokens as the eager model."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    model = VLModel.build(str(folders[kind]), "vl-pet-large", load_tok=False).eval()
    inputs, _ = batch(kind)
    with torch.no_grad():
        ref = model.generate(**inputs, num_beams=2, max_new_tokens=5)
        torch._dynamo.reset()
        counters.clear()
        try:
            compile_blocks(model, backend="aot_eager")
            got = model.generate(**inputs, num_beams=2, max_new_tokens=5)
            graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        finally:
            torch._dynamo.reset()
    assert torch.equal(got, ref)
    assert graphs > 0 and breaks == 0


class _Stub(torch.nn.Module):
    """What `Trainer._compile_scope` reads of a model: its input path, its architecture, its blocks."""

    def __init__(self, image_path, decoder_only, blocks=2):
        super().__init__()
        from types import SimpleNamespace

        self.native_inputs = image_path is not None
        self.arch = SimpleNamespace(image_path=image_path, decoder_only=decoder_only)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(blocks))


@pytest.mark.parametrize(("scope", "image_path", "decoder_only", "mode", "expected"), [
    ("auto", "florence2", False, "default", "blocks"),
    ("auto", "blip2", False, "max-autotune-no-cudagraphs", "blocks"),
    ("auto", "blip2", False, "reduce-overhead", "model"),  # CUDA graphs: one graph (see the config check)
    ("auto", None, False, "default", "model"),  # VL-BART / VL-T5: their measured path
    ("auto", "llava", True, "default", "model"),  # decoder-only VLMs: theirs
    ("model", "florence2", False, "default", "model"),
    ("blocks", None, False, "default", "blocks"),
])
def test_compile_scope_auto(scope, image_path, decoder_only, mode, expected):
    from types import SimpleNamespace

    from vlpet.train.loop import Trainer

    trainer = SimpleNamespace(cfg=SimpleNamespace(compile_scope=scope, compile_mode=mode, backbone="b"),
                              model=_Stub(image_path, decoder_only))
    assert Trainer._compile_scope(trainer) == expected


def test_compile_scope_blocks_without_blocks_is_a_config_error():
    from types import SimpleNamespace

    from vlpet import ConfigError
    from vlpet.train.loop import Trainer

    trainer = SimpleNamespace(cfg=SimpleNamespace(compile_scope="blocks", compile_mode="default", backbone="x"),
                              model=_Stub(None, False, blocks=1))
    with pytest.raises(ConfigError, match="--compile-scope blocks: x has no repeated blocks"):
        Trainer._compile_scope(trainer)


@pytest.mark.parametrize("kind", ["florence2", "blip2", "instructblip"])
def test_image_parts_are_what_frozen_image_features_runs(vlm_folders, kind):
    """The static-shape part is exactly the modules the frozen feature pass runs (images in, nothing else):
    InstructBLIP's Q-Former, which reads the instruction, is not in it."""
    from vlpet.compile import image_parts

    model = VLModel.build(vlm_folders[kind], "vl-pet-large", load_tok=False).eval()
    ran = set()
    hooks = [m.register_forward_hook(lambda mod, a, o, n=name: ran.add(n))
             for name, m in model.named_modules() if name and not list(m.children())]
    try:
        model.frozen_image_features(batch(kind)[0]["pixel_values"])
    finally:
        for h in hooks:
            h.remove()
    parts = image_parts(model)
    assert parts and ran
    assert all(any(n.startswith(p + ".") for p in parts) for n in ran)
    assert all(any(n.startswith(p + ".") for n in ran) for p in parts)


@pytest.mark.parametrize("kind", sorted(STACKED))
def test_the_image_path_compiles_static_and_the_language_model_dynamic(folders, kind, monkeypatch):
    """Images come at one size (only the batch varies), text lengths vary from batch to batch."""
    from vlpet.compile import image_parts

    model = VLModel.build(str(folders[kind]), "vl-pet-large", load_tok=False)
    seen = {}
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.__setitem__(id(self), kw["dynamic"]))
    compile_blocks(model)
    parts = image_parts(model)
    assert parts
    for name, block in repeated_blocks(model):
        image = any(name.startswith(p + ".") for p in parts)
        assert seen[id(block)] is (False if image else None), name
    assert any(v is False for v in seen.values()) and any(v is None for v in seen.values())


def test_a_model_with_no_repeated_blocks_is_an_error():
    with pytest.raises(ValueError, match="Linear has no repeated blocks"):
        compile_blocks(torch.nn.Linear(2, 2))


@pytest.mark.slow  # inductor compiles on the CPU, ~2 min on 2 clean cores: `bootstrap.sh test -m slow` (CI runs it)
def test_vlpet_train_compile_runs_by_blocks_from_images(tmp_path, monkeypatch):
    """`vlpet train --compile` on a Florence-2 compiles each block (the auto scope) with inductor, and trains and
    evaluates from raw images through the feature cache: the cache of the validation split, filled after
    training began, recompiles the image path with static shapes instead of failing in inductor's dynamic-shape
    analysis (as it did with dynamic shapes). Without the cache it ran too (by hand, 56 s)."""
    import json

    from vlm_fixtures import make_tiny_florence2

    from vlpet.cli import main
    from vlpet.data import make_image_fixture

    compiled = []
    original = torch.nn.Module.compile

    def recording(self, *args, **kwargs):
        compiled.append((type(self).__name__, kwargs.get("dynamic")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", recording)
    model_dir = make_tiny_florence2(tmp_path / "model", layers=2)  # two layers: the language model compiles too
    fx = make_image_fixture(tmp_path / "images", n_per_split=30)  # 5 steps an epoch: a loss logged every 10
    rc = main(["train", "--backbone", str(model_dir), "--method", "vl-pet-large", "--data-root", str(fx.data.root),
               "--image-root", str(fx.image_root), "--output", str(tmp_path / "run"), "--batch-size", "6",
               "--lr", "3e-2", "--seed", "1", "--caption-metrics", "BLEU-4,CIDEr", "--device", "cpu",
               "--no-progress", "--epochs", "5", "--tasks", "gqa", "--no-test", "--compile",
               "--image-cache-dir", str(tmp_path / "cache")])  # one task: fewer shapes to compile on the CPU
    assert rc == 0
    assert Counter(compiled) == {("Florence2VisionConvEmbed", False): 2, ("Florence2VisionBlock", False): 2,
                                 ("BartEncoderLayer", None): 2, ("BartDecoderLayer", None): 2}  # image path static
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    curve = [r["loss/gqa"] for r in rows if "loss/gqa" in r]
    assert len(curve) >= 2 and curve[-1] < curve[0] - 0.05, curve
    assert (tmp_path / "run" / "adapter-last").is_dir()
