"""Training and evaluation of VLMs from raw images (issue 18 point 5, "Speed and memory" point 1): the real-PNG
fixture in the VL-Adapter layout, datasets and collate through the VLM's own processor, the disk cache of frozen
image features, `vlpet train --image-root` end to end (loss falls, the cache replaces the vision tower, resume is
exact), and `vlpet predict --image --question`. Tiny random Florence-2 / BLIP-2 (Flan-T5-style T5) with real
processors, saved to a folder and loaded back through `VLModel.build`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from vlm_fixtures import (VisionCalls, interrupt_training_after, make_tiny_blip2, make_tiny_florence2,
                          make_tiny_instructblip, wrap_micro_step)

from vlpet.cli import main
from vlpet.data import (DataError, ImageFeatureCache, NativeCollator, TaskBatchLoader, build_dataset,
                        make_image_fixture, make_image_text_fixture, open_image)
from vlpet.data.image_fixtures import RGB
from vlpet.data.images import ImageRef, native_inputs
from vlpet.model import VLModel

TASKS = ("vqa", "gqa", "nlvr", "caption")


@pytest.fixture(scope="module")
def florence_dir(tmp_path_factory):
    return make_tiny_florence2(tmp_path_factory.mktemp("florence2") / "model")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_image_fixture(tmp_path_factory.mktemp("imgfx"), n_per_split=6)


@pytest.fixture(scope="module")
def florence(florence_dir):
    torch.manual_seed(0)
    return VLModel.build(str(florence_dir), "vl-pet-large").eval()


# -- the fixture ---------------------------------------------------------------------------------------
def test_fixture_writes_real_pngs_that_show_each_concept(fx, tmp_path):
    from PIL import Image

    assert len(fx.files) == len(fx.data.concepts) > 40
    for (source, img_id), path in fx.files.items():
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size == (32, 32)
            centre, corner = im.getpixel((16, 16)), im.getpixel((0, 0))
        assert corner == (128, 128, 128)
        concept = fx.data.concepts[(source, img_id)]
        if concept in RGB:  # COCO / NLVR2: the concept is the colour
            assert centre == RGB[concept], (path, concept)
        else:  # GQA: the shape; some colour of the palette
            assert centre in RGB.values()
    # where each source lives under --image-root
    rel = {s: str(p.relative_to(fx.image_root)) for (s, _), p in fx.files.items()}
    assert rel["COCO"].startswith(("coco/train2014/COCO_train2014_", "coco/val2014/COCO_val2014_"))
    assert rel["VG"].startswith("gqa/images/") and rel["GQA"].startswith("gqa/images/")
    assert rel["nlvr"].split("/")[:3] in (["nlvr2", "images", "train"], ["nlvr2", "images", "dev"],
                                          ["nlvr2", "images", "test1"])
    # the annotations are those of the feature fixture for the same seed
    feat = make_image_text_fixture(tmp_path / "feat", n_per_split=6, feat_dim=4)
    for name in ("vqa/karpathy_train.json", "GQA/testdev.json", "nlvr/valid.json", "COCO/dataset_coco.json"):
        assert (feat.root / name).read_bytes() == (fx.data.root / name).read_bytes(), name
    assert not list(fx.data.root.rglob("*.h5"))  # no feature files in the image fixture


def test_missing_or_broken_image_is_a_one_line_error_before_anything_is_written(fx, florence_dir, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(fx.image_root, images)
    victim = sorted((images / "gqa" / "images").iterdir())[0]
    victim.unlink()
    with pytest.raises(DataError, match=victim.stem) as err:
        build_dataset("gqa", "train", fx.data.root, None, image_root=images, model_type="florence2",
                      check_features=True)
    assert "image file" in str(err.value) and "\n" not in str(err.value)
    out = tmp_path / "run"
    rc = main(["train", "--backbone", str(florence_dir), "--data-root", str(fx.data.root), "--image-root", str(images),
               "--output", str(out), "--device", "cpu", "--no-progress", "--image-cache-dir", str(tmp_path / "c")])
    line = capsys.readouterr().err.strip()
    assert rc == 2 and victim.stem in line and len(line.splitlines()) == 1
    assert not out.exists()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png.*readable image"):
        open_image(ImageRef((str(broken),)))
    rc = main(["train", "--backbone", str(florence_dir), "--data-root", str(fx.data.root), "--image-root",
               str(tmp_path / "nowhere"), "--output", str(out), "--device", "cpu"])
    assert rc == 2 and "--image-root" in capsys.readouterr().err and not out.exists()
    # a VL-BART backbone reads feature files: refused with --image-root
    from conftest import make_tiny_bart

    bart, _ = make_tiny_bart(tmp_path / "bart", d_model=32)
    rc = main(["train", "--backbone", str(bart), "--data-root", str(fx.data.root), "--image-root", str(fx.image_root),
               "--output", str(out), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "precomputed image features" in err and len(err.splitlines()) == 1 and not out.exists()


# -- datasets and collate --------------------------------------------------------------------------------
def test_collate_is_the_processor_on_the_images_and_prompts(fx, florence):
    proc, tok = florence.processor, florence.tokenizer
    for task in TASKS:
        ds = build_dataset(task, "train", fx.data.root, tok, image_root=fx.image_root, model_type="florence2")
        examples = [ds.get_example(i, epoch=0) for i in range(3)]
        batch = NativeCollator(proc)(examples)
        want = proc(images=[open_image(e["image"]) for e in examples], text=[e["text"] for e in examples],
                    padding=True, return_tensors="pt")
        assert torch.equal(batch["input_ids"], want["input_ids"])
        assert torch.equal(batch["pixel_values"], want["pixel_values"])
        assert (batch["input_ids"][:, :17] == tok.image_token_id).all()  # 17 image tokens first (32 px)
        for row, e in zip(batch["target_ids"], examples):
            ids = tok(e["target_text"])["input_ids"]
            assert row[: len(ids)].tolist() == ids and (row[len(ids):] == -100).all()
    # NLVR2: both images, side by side
    ds = build_dataset("nlvr", "train", fx.data.root, tok, image_root=fx.image_root, model_type="florence2")
    ref = ds.get_example(0, epoch=0)["image"]
    pair = np.asarray(open_image(ref))
    assert pair.shape == (32, 64, 3)
    assert (pair[:, :32] == np.asarray(open_image(ImageRef(ref.paths[:1])))).all()
    assert (pair[:, 32:] == np.asarray(open_image(ImageRef(ref.paths[1:])))).all()


# -- the feature cache -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["florence2", "blip-2", "instructblip"])
def test_cache_holds_the_frozen_features_and_is_keyed_by_model_processor_and_image(kind, fx, florence,
                                                                                  tmp_path_factory, tmp_path):
    if kind == "florence2":
        model = florence
    else:
        make = make_tiny_blip2 if kind == "blip-2" else make_tiny_instructblip
        model = VLModel.build(str(make(tmp_path_factory.mktemp(kind) / "model")), "vl-pet-large").eval()
    proc = model.processor
    images = tmp_path / "images"
    shutil.copytree(fx.image_root, images)
    ds = build_dataset("nlvr", "valid", fx.data.root, model.tokenizer, image_root=images, model_type=kind)
    refs = ds.image_refs()
    cache = ImageFeatureCache(tmp_path / "cache", model.image_features_key(), proc)
    assert cache.build(model, refs, batch_size=4, progress=False) == len(refs) == len(ds)
    assert cache.build(model, refs, progress=False) == 0  # computed once
    pixels = proc.image_processor([open_image(refs[1])], return_tensors="pt")["pixel_values"]
    assert torch.equal(cache.load(refs[1]), model.frozen_image_features(pixels)[0])
    # a batch from the cache = a batch from pixels: the same text layout, the same logits
    plain = TaskBatchLoader(ds, 4, shuffle=False, collate_fn=NativeCollator(proc), task="nlvr").get_batch(0, 0)
    cached = TaskBatchLoader(ds, 4, shuffle=False, collate_fn=NativeCollator(proc, cache), task="nlvr").get_batch(0, 0)
    assert "pixel_values" not in cached and torch.equal(plain["input_ids"], cached["input_ids"])
    if kind == "instructblip":  # the Q-Former reads the statement, the language model the whole prompt
        texts = proc.tokenizer.batch_decode(cached["qformer_input_ids"], skip_special_tokens=True)
        assert texts == plain["sents"]
    with torch.no_grad():
        a = model(**native_inputs(plain), labels=plain["target_ids"]).logits
        b = model(**native_inputs(cached), labels=plain["target_ids"]).logits
    assert (a - b).abs().max().item() <= 1e-6
    # an edited image is recomputed, the others are not
    from PIL import Image

    Image.new("RGB", (32, 32), (0, 0, 0)).save(refs[0].paths[0], format="PNG")
    again = ImageFeatureCache(tmp_path / "cache", model.image_features_key(), proc)
    assert {r.paths for r in again.missing(refs)} == {r.paths for r in refs if refs[0].paths[0] in r.paths}
    # another processor setting reads nothing of the old cache
    other = type(proc.image_processor)(**{**proc.image_processor.to_dict(), "image_mean": [0.5, 0.5, 0.5]})
    extra = {} if kind == "florence2" else {"num_query_tokens": proc.num_query_tokens}
    if kind == "instructblip":
        extra["qformer_tokenizer"] = proc.qformer_tokenizer
    proc2 = type(proc)(image_processor=other, tokenizer=proc.tokenizer, **extra)
    assert ImageFeatureCache(tmp_path / "cache", model.image_features_key(proc2), proc2).missing(refs) == refs
    assert model.image_features_key() == cache.dir.name.rsplit("-", 1)[0]


# -- vlpet train / predict end to end ----------------------------------------------------------------------------
def _train(florence_dir, fx, out, cache_dir, *extra):
    return main(["train", "--backbone", str(florence_dir), "--method", "vl-pet-large", "--data-root", str(fx.data.root),
                 "--image-root", str(fx.image_root), "--output", str(out), "--batch-size", "6", "--lr", "3e-2",
                 "--seed", "1", "--caption-metrics", "BLEU-4,CIDEr", "--device", "cpu", "--no-progress",
                 "--image-cache-dir", str(cache_dir), *extra])


@pytest.fixture(scope="module")
def run(florence_dir, fx, tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_run")
    during_steps = []

    with VisionCalls("Florence2VisionBackbone") as calls:
        def step(original, self, batch):
            before = calls.images
            value = original(self, batch)
            during_steps.append(calls.images - before)
            return value

        with wrap_micro_step(step):
            rc = _train(florence_dir, fx, root / "run", root / "cache", "--epochs", "3")
    assert rc == 0
    return root, calls.images, during_steps


def test_train_from_images_loss_falls_and_the_cache_replaces_the_vision_tower(run, fx):
    root, total_images, during_steps = run
    out = root / "run"
    for name in ("results.json", "log.jsonl", "adapter-last/vlpet_config.json", "adapter-best/adapter_model.safetensors",
                 "checkpoint/trainer_state.pt"):
        assert (out / name).exists(), name
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # per task (VQA's loss is score-weighted over sampled answers: too noisy for 3 tiny epochs)
    for task in ("gqa", "nlvr", "caption"):
        curve = [r[f"loss/{task}"] for r in log if f"loss/{task}" in r]
        assert curve[-1] < curve[0] - 0.05, (task, curve)
    results = json.loads((out / "results.json").read_text())
    assert set(results["test"]["last"]) == set(TASKS)
    # every distinct image (by content: the tiny fixture draws a few identical PNGs) went through the vision
    # tower once, train, val and test images alike, and never during a training step
    assert len(during_steps) == results["steps"] and sum(during_steps) == 0
    keys = ImageFeatureCache(root / "unused", "k", florence_processor(root))
    distinct = set()
    for split in ("train", "val", "test"):
        for t in TASKS:
            ds = build_dataset(t, split, fx.data.root, None, image_root=fx.image_root, model_type="florence2")
            distinct |= {keys.digest(r) for r in ds.image_refs()}
    assert total_images == len(distinct) > 40


def florence_processor(root):
    import transformers

    return transformers.AutoProcessor.from_pretrained(json.loads((root / "run" / "run_config.json").read_text())["backbone"])


def test_without_the_cache_the_vision_tower_runs_every_step(florence_dir, fx, tmp_path):
    seen = []
    with VisionCalls("Florence2VisionBackbone") as calls:
        def step(original, self, batch):
            before = calls.images
            value = original(self, batch)
            seen.append((calls.images - before, len(batch["question_ids"]), "pixel_values" in batch))
            return value

        with wrap_micro_step(step):
            rc = _train(florence_dir, fx, tmp_path / "run", tmp_path / "cache", "--max-steps", "4", "--no-eval",
                        "--no-test", "--no-image-cache")
    assert rc == 0 and len(seen) == 4
    assert all(n_calls == n and pixels for n_calls, n, pixels in seen)
    assert not (tmp_path / "cache").exists()
    # the same steps on cached features train the same adapter (fp32 round-off: features batched differently)
    from vlpet.checkpoint import load_tensors

    assert _train(florence_dir, fx, tmp_path / "cached", tmp_path / "cache", "--max-steps", "4", "--no-eval",
                  "--no-test") == 0
    a = load_tensors(tmp_path / "run" / "adapter-last" / "adapter_model.safetensors")
    b = load_tensors(tmp_path / "cached" / "adapter-last" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for v in a.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_resume_continues_exactly(florence_dir, fx, tmp_path):
    from vlpet.checkpoint import load_tensors

    args = ("--epochs", "2", "--no-test", "--no-eval", "--save-every-steps", "5", "--limit-train", "12")
    assert _train(florence_dir, fx, tmp_path / "full", tmp_path / "cache", *args) == 0
    with interrupt_training_after(17):  # in epoch 2, two steps after the checkpoint of step 15
        assert _train(florence_dir, fx, tmp_path / "cut", tmp_path / "cache", *args) == 130
    assert not (tmp_path / "cut" / "adapter-last").exists()
    assert _train(florence_dir, fx, tmp_path / "cut", tmp_path / "cache", *args, "--resume") == 0
    a = load_tensors(tmp_path / "full" / "adapter-last" / "adapter_model.safetensors")
    b = load_tensors(tmp_path / "cut" / "adapter-last" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_predict_answers_one_question_about_one_image(run, fx, capsys):
    root, _, _ = run
    image = next(p for (s, _), p in fx.files.items() if s == "COCO")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(root / "run"), "--image", str(image), "--question",
                 "what color is the object?", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    model = VLModel.from_pretrained(root / "run" / "adapter-last").eval()
    enc = model.processor(images=[open_image(ImageRef((str(image),)))], text=["what color is the object?"],
                          return_tensors="pt")
    ids = model.generate(**native_inputs(dict(enc)), num_beams=1, do_sample=False, max_new_tokens=10)
    assert printed == model.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip()
    rc = main(["predict", "--checkpoint", str(root / "run"), "--image", str(image.with_name("nope.png")),
               "--question", "what?", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "nope.png" in err and len(err.splitlines()) == 1
    rc = main(["predict", "--checkpoint", str(root / "run"), "--device", "cpu"])
    assert rc == 2 and "--data-root, --task, --output required" in capsys.readouterr().err


def test_evaluate_and_predict_a_split_of_a_vlm_run(run, fx, tmp_path, capsys):
    root, _, _ = run
    out = root / "run"
    # the run's image root and feature cache by default; the scores of the run's own test pass
    assert main(["evaluate", "--checkpoint", str(out), "--data-root", str(fx.data.root), "--device", "cpu",
                 "--caption-metrics", "BLEU-4,CIDEr", "--output", str(tmp_path / "eval.json")]) == 0
    assert "| vl-pet-large (last) |" in capsys.readouterr().out
    scores = json.loads((tmp_path / "eval.json").read_text())["results"]["last"]["scores"]
    assert scores == json.loads((out / "results.json").read_text())["test"]["last"]
    # pixels instead of the cache: the same answers
    assert main(["predict", "--checkpoint", str(out), "--data-root", str(fx.data.root), "--task", "vqa",
                 "--output", str(tmp_path / "a.json"), "--device", "cpu"]) == 0
    assert main(["predict", "--checkpoint", str(out), "--data-root", str(fx.data.root), "--task", "vqa",
                 "--output", str(tmp_path / "b.json"), "--device", "cpu", "--no-image-cache"]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert a == json.loads((tmp_path / "b.json").read_text()) and len(a) == 6
    assert {"question_id", "answer"} == set(a[0])


@pytest.mark.parametrize("kind", ["blip-2", "instructblip"])
def test_train_from_images_on_blip2_and_instructblip(kind, fx, tmp_path):
    folder = (make_tiny_blip2 if kind == "blip-2" else make_tiny_instructblip)(tmp_path / "model")
    losses = {}

    def step(original, self, batch):
        value = original(self, batch)
        losses.setdefault(batch["task"], []).append(value)
        return value

    with wrap_micro_step(step):
        rc = main(["train", "--backbone", str(folder), "--data-root", str(fx.data.root), "--image-root",
                   str(fx.image_root), "--output", str(tmp_path / "run"), "--batch-size", "6", "--lr", "3e-2",
                   "--epochs", "2", "--no-eval", "--no-test", "--device", "cpu", "--no-progress",
                   "--image-cache-dir", str(tmp_path / "cache")])
    assert rc == 0 and (tmp_path / "run" / "adapter-last" / "adapter_model.safetensors").is_file()
    for task in ("gqa", "nlvr", "caption"):
        assert losses[task][-1] < losses[task][0] - 1.0, (task, losses[task])


def test_hyperformer_trains_and_evaluates_from_images(florence_dir, fx, tmp_path):
    # hyperformer's adapters read the task embedding: every native forward / generate must pass the task
    tasks = []

    def step(original, self, batch):
        tasks.append(batch["task"])
        return original(self, batch)

    with wrap_micro_step(step):
        rc = main(["train", "--backbone", str(florence_dir), "--method", "hyperformer", "--data-root",
                   str(fx.data.root), "--image-root", str(fx.image_root), "--output", str(tmp_path / "run"),
                   "--batch-size", "6", "--max-steps", "3", "--limit-eval", "6", "--no-test", "--device", "cpu",
                   "--no-progress", "--image-cache-dir", str(tmp_path / "cache")])
    assert rc == 0 and len(set(tasks)) >= 2
    assert (tmp_path / "run" / "adapter-last" / "adapter_model.safetensors").is_file()


def test_load_vlm_with_overrides_builds_the_vlm_once(florence_dir, florence, monkeypatch):
    import vlpet.model
    from vlpet.method import MethodConfig
    from vlpet.train.native import load_vlm

    real, built = vlpet.model.load_backbone, []

    def counting(name, **kw):
        if not kw.get("meta"):
            built.append(name)
        return real(name, **kw)

    monkeypatch.setattr(vlpet.model, "load_backbone", counting)
    overrides = {"task_prompts": False, "add_biases": True}
    model = load_vlm(str(florence_dir), "vl-pet-large", 0, overrides)
    assert built == [str(florence_dir)]
    # the preset as VLModel.build sizes it for this VLM, with the overrides on top
    assert model.method == MethodConfig.from_dict({**florence.method.to_dict(), **overrides})


@pytest.mark.parametrize("backbone", ["llava-1.5-7b", "smolvlm-2b"])
def test_image_root_refuses_a_builtin_decoder_only_name_before_building_it(backbone, fx, tmp_path, capsys, monkeypatch):
    # a built-in random-weight name has no processor: refused from its name, before the 2-7B weights are built
    import vlpet.model

    def no_build(*a, **kw):  # a real build of the 7B model would be the late failure
        raise AssertionError("the VLM was built")

    monkeypatch.setattr(vlpet.model, "load_backbone", no_build)
    rc = main(["train", "--backbone", backbone, "--data-root", str(fx.data.root), "--image-root", str(fx.image_root),
               "--output", str(tmp_path / "run"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and "no Hugging Face processor" in err and backbone in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_predict_reads_the_collators_inputs_on_instructblip(fx, tmp_path):
    # InstructBLIP's Q-Former reads the bare question in training; predict --image must give it the same
    from vlpet.train.native import predict_inputs

    model = VLModel.build(str(make_tiny_instructblip(tmp_path / "model")), "vl-pet-large")
    proc = model.processor
    for task in ("vqa", "caption"):
        ds = build_dataset(task, "val", fx.data.root, proc.tokenizer, image_root=fx.image_root,
                           model_type="instructblip")
        ex = ds.get_example(0, epoch=0)
        want = native_inputs(NativeCollator(proc)([ex]))
        got = predict_inputs(proc, "instructblip", task, ex["image"], ex["sent"])
        assert set(got) == set(want) and "qformer_input_ids" in got
        for k in want:
            assert torch.equal(got[k], want[k]), (task, k)
        if task == "vqa":  # the bare question, not the "Question: ... Answer:" prompt
            q = proc.qformer_tokenizer([ex["sent"]], return_tensors="pt")["input_ids"]
            assert ex["sent"] and torch.equal(got["qformer_input_ids"], q)


def test_cache_index_keeps_the_digests_of_every_writer(florence, tmp_path, monkeypatch):
    # ranks fill disjoint shards and each saves digests.json: no writer may drop another's entries
    import vlpet.data.image_cache as ic

    files = []
    for i in range(4):
        files.append(tmp_path / f"img{i}.bin")
        files[-1].write_bytes(bytes([i]) * 10)
    refs = [ImageRef((str(f),)) for f in files]
    a = ImageFeatureCache(tmp_path / "cache", "k", florence.processor)
    b = ImageFeatureCache(tmp_path / "cache", "k", florence.processor)  # both read the empty index first
    assert a.missing(refs[:2]) == refs[:2] and b.missing(refs[2:]) == refs[2:]  # each hashes and saves its half
    want = {str(f): ic.file_digest(f) for f in files}
    index = json.loads((tmp_path / "cache" / "digests.json").read_text())
    assert {k: v[2] for k, v in index.items()} == want
    monkeypatch.setattr(ic, "file_digest", lambda p: pytest.fail(f"{p} hashed again"))
    a.reload_index()  # after the barrier: b's entries without hashing b's files
    assert [a.digest(r) for r in refs] == list(want.values())
    assert [ImageFeatureCache(tmp_path / "cache", "k", florence.processor).digest(r) for r in refs] == \
        list(want.values())


def test_cache_of_a_missing_file_is_a_data_error(florence, tmp_path):
    cache = ImageFeatureCache(tmp_path / "cache", "k", florence.processor)
    with pytest.raises(DataError, match="nope.png"):
        cache.digest(ImageRef((str(tmp_path / "nope.png"),)))


def test_cache_builds_with_an_image_processor_alone(florence, fx, tmp_path):
    ip = florence.processor.image_processor
    ds = build_dataset("vqa", "train", fx.data.root, florence.tokenizer, image_root=fx.image_root,
                       model_type="florence2")
    refs = ds.image_refs()[:2]
    a = ImageFeatureCache(tmp_path / "a", "k", ip)
    assert a.build(florence, refs, progress=False) == 2
    b = ImageFeatureCache(tmp_path / "b", "k", florence.processor)  # the same image settings: the same features
    b.build(florence, refs, progress=False)
    for r in refs:
        assert torch.equal(a.load(r), b.load(r))


def test_an_items_image_is_found_once(fx, florence, monkeypatch):
    from vlpet.data.images import ImageRoot

    ds = build_dataset("nlvr", "train", fx.data.root, florence.tokenizer, image_root=fx.image_root,
                       model_type="florence2")
    first = [ds.get_example(i, epoch=0)["image"] for i in range(len(ds))]
    monkeypatch.setattr(ImageRoot, "find", lambda *a: pytest.fail("looked up again"))
    assert [ds.get_example(i, epoch=1)["image"] for i in range(len(ds))] == first


def test_predict_image_names_the_one_image_tasks_of_the_registry(tmp_path):
    from vlpet.errors import ConfigError
    from vlpet.train.native import answer

    with pytest.raises(ConfigError, match=r"--task nlvr: one image answers vqa, gqa, caption \(NLVR2"):
        answer(tmp_path / "run", tmp_path / "x.png", "q", task="nlvr")


def test_configuration_mistakes_are_config_errors_not_data_errors(tmp_path):
    """A model type without a prompt style or a video task for --image-root is an option mistake (ConfigError),
    not a problem with a file (DataError); the message names what was given and what was expected."""
    from vlpet.data.images import build_image_dataset, vlm_prompt
    from vlpet.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^<model>: expected a VLM of type florence2 / blip-2 / instructblip, "
                                          r"got 'llava'$") as err:
        vlm_prompt("llava", "vqa", "what?")
    assert not isinstance(err.value, DataError)
    with pytest.raises(ConfigError, match=r"^.*images: expected an image-text task \(vqa, gqa, nlvr, caption\) for "
                                          r"--image-root, got 'tvqa'$") as err:
        build_image_dataset("tvqa", "train", tmp_path, tmp_path / "images", None, "florence2")
    assert not isinstance(err.value, DataError)


def test_raw_images_and_feature_files_share_the_recipe(capsys):
    """Trainer._recipe sets epochs, lr and task specs and splits the paper's global batch over the processes
    for both inputs (build_native calls it): 3 processes without --batch-size get 500 // 3 = 166 VQA examples
    each, with the notice, and the other tasks are scaled from the VQA batch (spec §4.2)."""
    from types import SimpleNamespace

    from vlpet.data import task_batch_sizes
    from vlpet.train.loop import Trainer

    cfg = SimpleNamespace(method="vl-pet-large", epochs=None, lr=None, batch_size=None, caption_no_repeat_ngram_size=3)
    trainer = SimpleNamespace(cfg=cfg, dist=SimpleNamespace(world_size=3, is_main=True), tasks=TASKS, video=False)
    sizes, per_process = Trainer._recipe(trainer, "bart")
    assert (trainer.epochs, trainer.lr) == (20, 1e-3)
    assert per_process == task_batch_sizes(166) and sizes == task_batch_sizes(498)
    assert "the paper's batch 500 is not divisible by 3 processes; using 166 per process" in capsys.readouterr().out
    assert set(trainer.specs) == set(TASKS) and trainer.specs["caption"].decode_kwargs()["no_repeat_ngram_size"] == 3
