"""The registries: a granularity is one `Gate` class, a preset one registered builder. A toy granularity
registered here is placed, initialised, zero-initialised, saved and loaded without touching any other file."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batch, perturb, shrink
from torch import nn

from vlpet import ConfigError, VLModel
from vlpet.granularity import GATES, Gate, GateOptions, gate_kinds, paper_granularities, register_gate
from vlpet.official import detect_granularity, export_official
from vlpet import presets
from vlpet.presets import family_for, get_preset, list_presets, register_preset, train_defaults


class ToyGate(Gate):
    """G = σ(w · Y + b + c) [B, N, 1]: a Linear (the backbone's init rule applies) plus its own
    parameter c, initialised to 2 by the class (no rule touches a bare Parameter)."""

    kind = "toy"

    def __init__(self, d_model, opts):
        super().__init__(d_model, opts)
        self.proj = nn.Linear(d_model, 1)
        self.offset = nn.Parameter(torch.full((1,), 2.0))

    def forward(self, x, y, mask=None):
        return torch.sigmoid(self.proj(y) + self.offset)

    def zero_init(self):
        self.proj.weight.zero_()
        self.proj.bias.zero_()
        self.offset.zero_()  # G = σ(0) = 0.5


@pytest.fixture
def toy():
    register_gate(ToyGate)
    try:
        yield ToyGate
    finally:
        GATES.pop("toy", None)


def toy_method(arch):
    return shrink(get_preset("vl-pet-small", arch), r=16, gate={"kind": "toy"})


def toy_pets(model):
    return [m for m in model.modules() if type(m).__name__ == "GatedModification" and isinstance(m.gate, ToyGate)]


def test_builtin_granularities_are_registered_in_order():
    import vlpet.decoder_only  # noqa: F401  registers the causal G_small of decoder-only VLMs (issue 20)

    assert gate_kinds() == ("none", "small", "middlex", "middley", "large", "causal_small")
    assert paper_granularities() == ("small", "middlex", "middley", "large")
    assert GateOptions(kind="none") and GATES["none"].build(32, GateOptions()) is None  # G ≡ 1: nothing placed


def test_unknown_and_duplicate_granularities_are_refused(toy):
    with pytest.raises(ConfigError, match="'toy' is empty or registered twice"):
        register_gate(ToyGate)
    GATES.pop("toy")
    with pytest.raises(ConfigError, match=r"granularity 'toy' is unknown; allowed: none, small"):
        GateOptions(kind="toy")


def test_toy_gate_is_placed_and_computes_its_formula(build, toy):
    model = build("bart", toy_method("bart"), perturbed=True)
    pets = toy_pets(model)
    assert len(pets) == 4  # encoder self-attention and FFN of both layers, nothing in the decoder
    seen = []

    def hook(mod, args, out):
        h = args[0]
        y = h + mod.delta(h)
        g = torch.sigmoid(y @ mod.gate.proj.weight.T + mod.gate.proj.bias + mod.gate.offset)
        seen.append(float((out - mod.scale * g * y).abs().max()))

    hooks = [p.register_forward_hook(hook) for p in pets]
    try:
        with torch.no_grad():
            model.encode(**make_batch("bart"))
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) == 4 and max(seen) < 1e-5


def test_toy_gate_init_and_zero_init(build, toy):
    # BART: the backbone's rule gives the gate's Linear N(0, 0.02) and a zero bias; the class's own c stays.
    for pet in toy_pets(build("bart", toy_method("bart"))):
        assert torch.equal(pet.gate.proj.bias, torch.zeros(1))
        assert float(pet.gate.proj.weight.detach().abs().max()) < 0.1  # PyTorch's default would reach 1/sqrt(32)
        assert torch.equal(pet.gate.offset.detach(), torch.full((1,), 2.0))
    # T5's presets carry the 'gate' zero-init flag: the class's zero_init runs, so G = 0.5 exactly.
    model = build("t5", toy_method("t5"))
    pets = toy_pets(model)
    for pet in pets:
        assert float(pet.gate.offset.detach()) == 0.0
        pet.record = True
    with torch.no_grad():
        model.encode(**make_batch("t5"))
    assert len(pets) == 4 and all(torch.equal(p.last_gate, torch.full_like(p.last_gate, 0.5)) for p in pets)


def test_toy_gate_saves_and_loads(build, toy, tmp_path):
    model = build("bart", toy_method("bart"))
    perturb(model, scale=0.3, seed=5)
    folder = model.save_pretrained(tmp_path / "toy")
    loaded = VLModel.from_pretrained(folder).eval()
    assert loaded.method == model.method and loaded.method.modules[0].gate.kind == "toy"
    keys = [k for k in loaded.state_dict() if ".pet.gate." in k]
    assert sorted({k.rpartition(".pet.gate.")[2] for k in keys}) == ["offset", "proj.bias", "proj.weight"]
    sd = model.state_dict()
    for k in keys:
        assert torch.equal(loaded.state_dict()[k], sd[k]), k
    batch = make_batch("bart")
    with torch.no_grad():
        assert torch.equal(loaded.encode(**batch)[0].last_hidden_state, model.encode(**batch)[0].last_hidden_state)
    # No official name: export refuses it, and it never matches an official checkpoint's gates.
    with pytest.raises(ConfigError, match="no official name"):
        export_official(model)
    assert detect_granularity({"x.adapter_gating_toy.weight": torch.zeros(1)}) is None


def test_preset_tables_are_the_papers_rows():
    baselines = ("full", "bitfit", "prompt", "lora", "compacter", "hyperformer", "vl-adapter")
    assert presets.TABLE2 == baselines + ("vl-pet-small", "vl-pet-middlex", "vl-pet-middley", "vl-pet-large")
    assert presets.TABLE9 == ("compacter-g-small-lw", "compacter-g-middlex-lw", "compacter-g-middley-lw",
                              "compacter-g-large-lw", "vl-adapter-g-small-lw", "vl-adapter-g-middlex-lw",
                              "vl-adapter-g-middley-lw", "vl-adapter-g-large-lw")
    assert presets.PRESETS == presets.TABLE2 + presets.TABLE9 == list_presets()


def test_a_registered_preset_resolves_for_every_family():
    @register_preset("toy-adapter", "baseline", lr=5e-5)
    def _toy(f, d_model=None):
        from vlpet.method import MethodConfig, ModuleSpec
        return MethodConfig(name="toy-adapter", modules=(ModuleSpec(placements=("encoder.ffn",), r=f.r),))

    try:
        assert "toy-adapter" in list_presets("baseline") and "toy-adapter" not in list_presets("table9")
        assert get_preset("Toy-Adapter", "bart").modules[0].r == 96
        assert get_preset("toy-adapter", "t5").modules[0].r == 192
        assert get_preset("toy-adapter", "t5", d_model=512).modules[0].r == 128  # T5 family: d/4
        assert train_defaults("toy-adapter", "t5") == presets.TrainDefaults(lr=5e-5, batch_size=300)
        with pytest.raises(ConfigError, match="'toy-adapter' is registered twice"):
            register_preset("toy-adapter", "baseline")(_toy)
    finally:
        presets._REGISTRY.pop("toy-adapter", None)
    with pytest.raises(ConfigError, match="unknown method/preset 'toy-adapter'"):
        get_preset("toy-adapter")



def test_decoder_only_presets_are_a_family_table_of_the_registry():
    """Decoder-only VLMs resolve their presets by lookup in family "decoder"'s own table: names, the
    family's settings and its one-line error come from the registry; a preset registered for that family
    is offered there only, and the BART / T5 table does not leak into it (no prompt tuning there)."""
    from vlpet import decoder_only

    assert list_presets(family="decoder") == decoder_only.DECODER_PRESETS
    assert list_presets("table9", family="decoder") == tuple(f"vl-adapter-g-{g}-lw" for g in paper_granularities())
    assert presets.lookup_preset("vl-pet-large", "decoder").build is not presets.lookup_preset("vl-pet-large").build
    assert train_defaults("full", "decoder") == presets.TrainDefaults(lr=1e-5, batch_size=64)
    assert train_defaults("LoRA", "decoder") == presets.TrainDefaults(lr=3e-4, batch_size=64)
    # d/8 rounded to a multiple of the 4 heads; the value adapter r = d/8 as it is; LoRA r = d/6
    assert [m.r for m in get_preset("vl-pet-small", "decoder", d_model=1000).modules] == [124, 125]
    assert get_preset("lora", "decoder", d_model=1000).lora.r == 167
    assert get_preset("vl-pet-small", "decoder").modules[0].gate.kind == "causal_small"
    with pytest.raises(ConfigError, match="^preset 'prompt' is not offered on decoder-only VLMs; allowed: full, "):
        get_preset("prompt", "decoder")

    @register_preset("toy-decoder", "baseline", family="decoder")
    def _toy(f, d_model=None):
        from vlpet.method import MethodConfig
        return MethodConfig(name="toy-decoder", trainable=("visual_embedding",), description=f"{f.name} {f.lr}")

    try:
        assert get_preset("toy-decoder", "decoder").description == "decoder 0.0003"
        assert "toy-decoder" in list_presets(family="decoder") and "toy-decoder" not in list_presets()
        with pytest.raises(ConfigError, match="unknown method/preset 'toy-decoder'"):
            get_preset("toy-decoder", "bart")
    finally:
        presets._OWN["decoder"].pop("toy-decoder", None)

def test_families_come_from_the_table():
    assert family_for("t5").scale == 0.3 and family_for("bart", video=True).lr == 7e-4
    with pytest.raises(ConfigError, match=r"preset family 'llama' is unknown; allowed: bart, t5"):
        get_preset("vl-pet-small", "llama")
    with pytest.raises(ConfigError, match="group 'table3'"):
        register_preset("x", "table3")


# -- tasks -------------------------------------------------------------------------------------------

@pytest.fixture
def task_registry():
    from vlpet.data import tasks

    saved = dict(tasks._REGISTRY), dict(tasks._ALIASES)
    try:
        yield tasks
    finally:
        tasks._REGISTRY.clear(), tasks._REGISTRY.update(saved[0])
        tasks._ALIASES.clear(), tasks._ALIASES.update(saved[1])


def test_task_registry_holds_the_papers_tasks(task_registry):
    t = task_registry
    assert t.TASKS == ("vqa", "gqa", "nlvr", "caption") and t.VIDEO_TASKS == ("tvqa", "how2qa", "tvc", "yc2c")
    assert t.task_names("video", "qa") == ("tvqa", "how2qa") and t.task_names("image", "caption") == ("caption",)
    assert [t.canonical_task(a) for a in ("VQAv2", "nlvr2", "coco", "youcook2")] == ["vqa", "nlvr", "caption", "yc2c"]
    assert t.is_video_task("youcook2") and not t.is_video_task("coco")
    assert t.task_modality(("vqa", "coco")) == "image" and t.task_modality(("tvc", "YouCook2")) == "video"
    with pytest.raises(ConfigError, match=r"mixes image-text \(nlvr2\) and video-text \(tvqa\)"):
        t.task_modality(("nlvr2", "tvqa"))


def test_a_new_task_is_one_entry(task_registry):
    """A raw-image QA task registered once is known to the aliases, the specs, the modality rule, the
    CLI's choices and the Table-2 row (its metric and column), without any other edit."""
    from vlpet.cli import build_parser
    from vlpet.data.tasks import Task, TaskSpec, register_task

    def build(o):
        return TaskSpec("rawqa", o.prompt("rawqa: "), 32, 8, 1, "sample", False, o.qa_decode())

    register_task(Task("rawqa", "image", "qa", build, metric="score", column="RawQA", aliases=("raw-qa",)))
    t = task_registry
    assert t.canonical_task("RAW-QA") == "rawqa" and "rawqa" in t.task_names("image", "qa")
    spec = t.get_task_spec("raw-qa", use_prompts=False, qa_max_new_tokens=3)
    assert spec.prompt == "" and spec.decode == {"num_beams": 1, "do_sample": False, "max_new_tokens": 3}
    assert t.task_modality(("rawqa", "vqa")) == "image"
    with pytest.raises(ConfigError, match=r"mixes image-text \(rawqa\) and video-text \(tvc\)"):
        t.task_modality(("rawqa", "tvc"))
    args = build_parser().parse_args(["predict", "--checkpoint", "c", "--data-root", "d", "--task", "rawqa",
                                      "--output", "o.json"])
    assert args.task == "rawqa"
    from vlpet.train.evaluate import table_row

    avg, header, row = table_row("m", 1.5, {"rawqa": {"accuracy": 9.0, "score": 40.0}, "vqa": {"accuracy": 70.0}},
                                 ("rawqa", "vqa"))
    assert avg == 55.0 and header.splitlines()[0] == "| Method | Params % | RawQA | VQA | Avg |"
    assert row == "| m | 1.50 | 40.00 | 70.00 | 55.00 |"
    with pytest.raises(ConfigError, match=r"name\(s\) \['vqav2'\] already registered"):
        register_task(Task("vqa2", "image", "qa", build, aliases=("vqav2",)))
    with pytest.raises(ConfigError, match="modality 'audio'"):
        register_task(Task("asr", "audio", "caption", build))
