"""`vlpet train --image-root` and `vlpet predict --image` on decoder-only VLMs (issue 20 point 1): the collator's
prompts and labels token by token against the family's own processor, the run end to end (loss falls, the vision
tower runs every step, resume is exact, NLVR2 evaluation reads the first answer token), one-line errors. Tiny
random LLaVA (no chat template: vlpet's "USER: <image>\\n... ASSISTANT:") and Idefics3 (a SmolVLM chat template)
with real processors, saved to a folder and loaded back through the public path. Qwen2-VL (a Qwen2-VL chat
template, M-RoPE inputs) too where torchvision is installed (its processor's video half needs it): those cases
skip elsewhere."""

from __future__ import annotations

import json

import pytest
import torch
from decoder_only_fixtures import make_tiny_idefics3, make_tiny_llava, make_tiny_paligemma, make_tiny_qwen2_vl
from vlm_fixtures import VisionCalls, interrupt_training_after, wrap_micro_step

from vlpet.cli import main
from vlpet.data import build_dataset, make_image_fixture, open_image
from vlpet.data.decoder_prompts import DecoderOnlyCollator
from vlpet.data.images import ImageRef, native_inputs
from vlpet.model import VLModel

FAMILIES = ("llava", "idefics3")  # trained end to end
COLLATE_FAMILIES = FAMILIES + ("paligemma",)
# 32 px / patch 8 (CLS dropped); pixel shuffle x2; Qwen2-VL's 2 x 2 patch merger
TOKENS_PER_IMAGE = {"llava": 16, "idefics3": 4, "paligemma": 16, "qwen2_vl": 4}
IMAGE_TOKEN = {"llava": "<image>", "idefics3": "<image>", "paligemma": "<image>", "qwen2_vl": "<|image_pad|>"}
# one image in a hand-written prompt, before the processor expands it
IMAGE_TEXT = {**IMAGE_TOKEN, "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}
# the prompt a user of each family writes by hand (LLaVA-1.5's format; SmolVLM's chat format; PaliGemma's
# image tokens first, its processor adding BOS and "\n")
PROMPT = {"llava": "USER: {images}\n{text} ASSISTANT:",
          "idefics3": "<|im_start|>User:{images}{text}<end_of_utterance>\nAssistant:",
          "paligemma": "{images}{text}",
          "qwen2_vl": "<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n"}  # Qwen2-VL-Instruct's
_TEXT = {"vqa": "{sent}", "caption": "A short image caption:",
         "nlvr": "Is this statement about the two images true or false? {sent}"}
TEXT = {"llava": _TEXT, "idefics3": _TEXT, "qwen2_vl": _TEXT,
        "paligemma": {"vqa": "answer en {sent}", "caption": "caption en"}}
_TWO = (("vqa", 1), ("caption", 1), ("nlvr", 2))
TASK_IMAGES = {"llava": _TWO, "idefics3": _TWO, "qwen2_vl": _TWO, "paligemma": _TWO[:2]}  # PaliGemma: one image
ANSWER_SEP = {"llava": " ", "idefics3": " ", "paligemma": "", "qwen2_vl": ""}  # Qwen: the answer after "assistant\n"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_image_fixture(tmp_path_factory.mktemp("imgfx"), n_per_split=6)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder_vlms")
    return {"llava": make_tiny_llava(root / "llava"), "idefics3": make_tiny_idefics3(root / "idefics3"),
            "paligemma": make_tiny_paligemma(root / "paligemma")}


@pytest.fixture(scope="module")
def models(dirs):
    return {f: VLModel.build(str(d), "vl-pet-large").eval() for f, d in dirs.items()}


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    pytest.importorskip("torchvision")  # Qwen2VLProcessor's video processor
    return make_tiny_qwen2_vl(tmp_path_factory.mktemp("decoder_vlms") / "qwen2_vl")


@pytest.fixture(scope="module")
def qwen2_vl_model(qwen2_vl_dir):
    return VLModel.build(str(qwen2_vl_dir), "vl-pet-large").eval()


def _model_of(family, request):
    """The built model of a family; Qwen2-VL's only when torchvision is there (else the test skips)."""
    if family == "qwen2_vl":
        return request.getfixturevalue("qwen2_vl_model")
    return request.getfixturevalue("models")[family]


def _batch(model, family, fx, task, n=3, split="train"):
    ds = build_dataset(task, split, fx.data.root, model.tokenizer, image_root=fx.image_root, model_type=family)
    examples = [ds.get_example(i, epoch=0) for i in range(n)]
    return examples, DecoderOnlyCollator(model.processor, family)(examples)


# -- the collator ------------------------------------------------------------------------------------------
def test_a_batch_is_one_task_in_both_collators(models, fx):
    # the check DecoderOnlyCollator shares with the encoder-decoder NativeCollator: refused before the processor
    from vlpet.data import NativeCollator

    model = models["llava"]
    gqa, _ = _batch(model, "llava", fx, "gqa", n=1)
    caption, _ = _batch(model, "llava", fx, "caption", n=1)
    for collate in (DecoderOnlyCollator(model.processor, "llava"), NativeCollator(model.processor)):
        with pytest.raises(ValueError, match="an empty batch"):
            collate([])
        with pytest.raises(ValueError, match=r"a batch mixes tasks \['caption', 'gqa'\]"):
            collate(gqa + caption)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # in PaliGemma's processor
@pytest.mark.parametrize("family", COLLATE_FAMILIES + ("qwen2_vl",))
def test_prompt_and_labels_token_by_token(family, fx, request):
    model = _model_of(family, request)
    proc, tok = model.processor, model.tokenizer
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN[family])
    assert image_id != tok.unk_token_id
    for task, n_images in TASK_IMAGES[family]:
        examples, batch = _batch(model, family, fx, task)
        images = [[open_image(ImageRef((p,))) for p in e["image"].paths] for e in examples]
        assert [len(i) for i in images] == [n_images] * 3
        text = TEXT[family][task]
        prompts = [PROMPT[family].format(images=IMAGE_TEXT[family] * n_images, text=text.format(sent=e["sent"]))
                   for e in examples]
        if family in ("idefics3", "qwen2_vl"):  # the processor's own chat template renders the same prompt
            assert prompts[0] == proc.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}] * n_images +
                  [{"type": "text", "text": text.format(sent=examples[0]["sent"])}]}],
                add_generation_prompt=True, tokenize=False)
        tok.padding_side = "left"
        want = proc(images=images if family == "idefics3" else [i for im in images for i in im], text=prompts,
                    padding=True, return_tensors="pt")
        want.pop("labels", None)  # PaliGemma's processor derives labels from token_type_ids: not an input
        tok.padding_side = "right"  # the collator must set left padding itself
        _, batch = _batch(model, family, fx, task)
        assert set(want) == set(native_inputs(batch)), task
        for k in want:
            assert torch.equal(batch[k], want[k]), (task, k)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert (mask[:, -1] == 1).all()  # left-padded
        if task == "vqa":  # questions of different lengths: the padding is checked, not absent
            assert (mask.sum(1) < ids.shape[1]).any()
        for row, m in zip(ids, mask):
            pad = int((m == 0).sum())
            assert (row[:pad] == tok.pad_token_id).all()
            # BOS first; PaliGemma's processor puts it after the image tokens
            assert row[pad + (TOKENS_PER_IMAGE[family] if family == "paligemma" else 0)] == tok.bos_token_id
        assert ((ids == image_id).sum(1) == n_images * TOKENS_PER_IMAGE[family]).all()
        # labels: exactly the answer as it follows the prompt (" yes" after "ASSISTANT:", one BPE token with its
        # space; "yes" after PaliGemma's "\n") + EOS; an example without answers (the fixture has some) trains on EOS
        sep = ANSWER_SEP[family]
        for row, e in zip(batch["target_ids"], examples):
            answer = tok(sep + e["target_text"], add_special_tokens=False)["input_ids"] if e["target_text"] else []
            assert row.tolist() == answer + [tok.eos_token_id] + [-100] * (len(row) - len(answer) - 1), task
            assert tok.bos_token_id not in row.tolist()
        if task == "nlvr":
            cls = [tok(sep + w, add_special_tokens=False)["input_ids"][0] for w in ("false", "true")]
            assert batch["class_token_ids"].tolist() == [cls] * 3
        # the batch is what the model takes: the answer's loss, and generation from the prompt
        with torch.no_grad():
            out = model(**native_inputs(batch), labels=batch["target_ids"])
            new = model.generate(**native_inputs(batch), max_new_tokens=2)
        assert out.logits.shape[:2] == batch["target_ids"].shape and torch.isfinite(out.loss)
        assert new.shape == (3, 2)
        if family == "qwen2_vl":  # each 32 px image: one frame of 4 x 4 patches (8 px), merged 2 x 2 into 4 tokens
            assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * (3 * n_images)
            assert batch["pixel_values"].shape[0] == 16 * 3 * n_images
            if "mm_token_type_ids" in want:  # transformers 5's M-RoPE input: exactly the image tokens are marked
                assert torch.equal(batch["mm_token_type_ids"] != 0, ids == image_id)
            # vl-pet-large starts as the plain model (its gates at 1): the answer logits equal the plain Hugging
            # Face model's fed as its docs say (processor output, the answer appended as text tokens, no image)
            _assert_plain_qwen2_vl_logits(request.getfixturevalue("qwen2_vl_dir"), batch, out.logits)


def _assert_plain_qwen2_vl_logits(folder, batch, logits):
    import transformers

    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(folder).eval()
    labels = batch["target_ids"]
    known = labels[:, :-1] != -100
    answer = labels[:, :-1].masked_fill(~known, hf.config.text_config.pad_token_id)
    kw = {k: batch[k] for k in ("pixel_values", "image_grid_thw")}
    if "mm_token_type_ids" in batch:  # text (0) for the answer tokens
        kw["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(answer)], 1)
    with torch.no_grad():
        ref = hf(input_ids=torch.cat([batch["input_ids"], answer], 1),
                 attention_mask=torch.cat([batch["attention_mask"], known.long()], 1), **kw).logits
    ref = ref[:, batch["input_ids"].shape[1] - 1:]
    keep = labels != -100  # the positions that predict an answer token (the rest read padding)
    torch.testing.assert_close(logits[keep], ref[keep], rtol=1e-5, atol=1e-5)


def test_long_answers_keep_the_eos(models, fx):
    model = models["llava"]
    coll = DecoderOnlyCollator(model.processor, "llava")
    ids = coll.answer_ids("USER: <image>\nq ASSISTANT:", "a b c d e f g h", max_len=4)
    assert ids == model.tokenizer(" a b c", add_special_tokens=False)["input_ids"] + [model.tokenizer.eos_token_id]


def test_caption_max_length_becomes_new_tokens():
    # the task spec's seq2seq max_length counts the decoder's tokens with its start token; decoder-only
    # generate would count the prompt too
    from vlpet.data.decoder_prompts import generation_settings
    from vlpet.data.tasks import get_task_spec

    spec = get_task_spec("caption").decode_kwargs()
    got = generation_settings(spec)
    assert "max_length" not in got and got["max_new_tokens"] == spec["max_length"] - 1
    assert {k: v for k, v in got.items() if k != "max_new_tokens"} == {k: v for k, v in spec.items()
                                                                      if k != "max_length"}


@pytest.mark.parametrize("family", FAMILIES)
def test_nlvr_reads_the_first_answer_token_of_each_class(family, models, fx):
    """Evaluation's class logits = the teacher-forced logits of the class word's first answer token."""
    from vlpet.data import TaskBatchLoader
    from vlpet.data.tasks import get_task_spec
    from vlpet.train.evaluate import predict_task

    model = models[family]
    ds = build_dataset("nlvr", "val", fx.data.root, model.tokenizer, image_root=fx.image_root, model_type=family)
    coll = DecoderOnlyCollator(model.processor, family)
    loader = TaskBatchLoader(ds, 3, shuffle=False, collate_fn=coll, task="nlvr")
    result = predict_task(model, loader, get_task_spec("nlvr"), model.tokenizer, torch.device("cpu"), progress=False)
    batch = loader.get_batch(0, 0)
    got = [result["gold"]["logits"][q] for q in batch["question_ids"]]
    with torch.no_grad():
        forced = {}
        for word in ("false", "true"):
            labels = torch.tensor([coll.answer_ids("", word)] * 3)
            forced[word] = model(**native_inputs(batch), labels=labels).logits[:, 0].gather(
                1, labels[:, :1]).squeeze(1)
    want = torch.stack([forced["false"], forced["true"]], 1)
    torch.testing.assert_close(torch.tensor(got), want, rtol=1e-4, atol=1e-5)


# -- vlpet train / predict end to end --------------------------------------------------------------------------
def _train(folder, fx, out, *extra):
    return main(["train", "--backbone", str(folder), "--method", "vl-pet-large", "--data-root", str(fx.data.root),
                 "--image-root", str(fx.image_root), "--output", str(out), "--tasks", "gqa,nlvr,caption",
                 "--batch-size", "6", "--lr", "3e-1", "--seed", "1", "--device", "cpu", "--no-progress",
                 "--epochs", "3", "--limit-train", "6", "--no-eval", "--no-test", "--save-every-steps", "5", *extra])


def _train_recording(folder, fx, out, vision_class):
    """`vlpet train` with every step's (task, images through the vision tower, examples, loss, epoch) recorded."""
    steps = []
    with VisionCalls(vision_class) as calls:
        def step(original, self, batch):
            before = calls.images
            value = original(self, batch)
            steps.append((batch["task"], calls.images - before, len(batch["question_ids"]), value, batch["epoch"]))
            return value

        with wrap_micro_step(step):
            assert _train(folder, fx, out) == 0
    return steps


def _assert_loss_falls(steps):
    # per task, the example-weighted mean loss of the last epoch against the first (batches of 5 and 1 alternate)
    def mean(task, epoch):
        rows = [(loss, n) for t, _, n, loss, e in steps if t == task and e == epoch]
        return sum(loss * n for loss, n in rows) / sum(n for _, n in rows)

    for task in ("gqa", "nlvr", "caption"):
        assert mean(task, 2) < mean(task, 0) - 0.1, (task, mean(task, 0), mean(task, 2))


@pytest.fixture(scope="module")
def llava_run(dirs, fx, tmp_path_factory):
    out = tmp_path_factory.mktemp("llava_run") / "run"
    return out, _train_recording(dirs["llava"], fx, out, "CLIPVisionModel")


def test_train_llava_loss_falls_and_the_vision_tower_runs_every_step(llava_run):
    out, steps = llava_run
    for name in ("log.jsonl", "adapter-last/adapter_model.safetensors", "checkpoint/trainer_state.pt"):
        assert (out / name).exists(), name
    _assert_loss_falls(steps)
    # no feature cache: every step's images went through the vision tower, NLVR2's two per example
    assert len(steps) == 18 and all(n_img == n * (2 if task == "nlvr" else 1) for task, n_img, n, _, _ in steps)


def test_train_idefics3_loss_falls(dirs, fx, tmp_path, capsys):
    # its vision transformer is called with keywords; its patch embedding (the only Conv2d) with the pixels
    steps = _train_recording(dirs["idefics3"], fx, tmp_path / "run", "Conv2d")
    assert "decoder-only VLM" in capsys.readouterr().out  # the cache-off line says why
    _assert_loss_falls(steps)
    assert all(n_img == n * (2 if task == "nlvr" else 1) for task, n_img, n, _, _ in steps)


@pytest.fixture(scope="module")
def qwen2_vl_run(qwen2_vl_dir, fx, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen2_vl_run") / "run"
    # the patch embedding is called with the flat patches: 16 rows (4 x 4 patches) per 32 px image
    return out, _train_recording(qwen2_vl_dir, fx, out, "PatchEmbed")


def test_train_qwen2_vl_loss_falls(qwen2_vl_run):
    out, steps = qwen2_vl_run
    assert (out / "adapter-last" / "adapter_model.safetensors").exists()
    _assert_loss_falls(steps)
    # every step's images through the vision tower (NLVR2's two per example, not pasted)
    assert len(steps) == 18 and all(rows == 16 * n * (2 if task == "nlvr" else 1) for task, rows, n, _, _ in steps)


def _predict_image(out, fx, capsys, prompt):
    """`vlpet predict --image` of the run ``out`` with "what color is it?" on a COCO image: (the line it printed,
    what the saved model generates greedily from ``prompt`` laid out by its own processor, that encoding, the
    model)."""
    image = next(p for (s, _), p in fx.files.items() if s == "COCO")
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(out), "--image", str(image), "--question", "what color is it?",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    model = VLModel.from_pretrained(out / "adapter-last").eval()
    model.tokenizer.padding_side = "left"
    enc = model.processor(images=[open_image(ImageRef((str(image),)))], text=[prompt], return_tensors="pt")
    ids = model.generate(**native_inputs(enc), num_beams=1, do_sample=False, max_new_tokens=10)
    return printed, model.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip(), enc, model


def test_predict_image_answers_with_the_trained_qwen2_vl(qwen2_vl_run, fx, capsys):
    # `vlpet predict --image` = generate from the Qwen2-VL chat prompt the processor lays out (image grid, M-RoPE)
    out, _ = qwen2_vl_run
    prompt = PROMPT["qwen2_vl"].format(images=IMAGE_TEXT["qwen2_vl"], text="what color is it?")
    printed, want, enc, model = _predict_image(out, fx, capsys, prompt)
    assert (enc["input_ids"] == model.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum() == 4
    assert printed == want and printed  # the trained model says something


def test_predict_a_split_of_a_llava_run(llava_run, fx, tmp_path):
    # `vlpet predict --data-root`: the run's image root, no cache, generation (GQA) and classification (NLVR2)
    out, _ = llava_run
    for task in ("gqa", "nlvr"):
        assert main(["predict", "--checkpoint", str(out), "--data-root", str(fx.data.root), "--task", task,
                     "--output", str(tmp_path / f"{task}.json"), "--limit", "3", "--device", "cpu"]) == 0
        rows = json.loads((tmp_path / f"{task}.json").read_text())
        assert len(rows) == 3 and all(r["prediction"] for r in rows), rows
        if task == "nlvr":
            assert {r["prediction"] for r in rows} <= {"True", "False"}


def test_resume_continues_exactly(llava_run, dirs, fx, tmp_path):
    from vlpet.checkpoint import load_tensors

    full, _ = llava_run
    with interrupt_training_after(12):  # in epoch 2, two steps after the checkpoint of step 10
        assert _train(dirs["llava"], fx, tmp_path / "cut") == 130
    assert _train(dirs["llava"], fx, tmp_path / "cut", "--resume") == 0
    a = load_tensors(full / "adapter-last" / "adapter_model.safetensors")
    b = load_tensors(tmp_path / "cut" / "adapter-last" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for v in a.values())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_predict_image_answers_with_the_trained_llava(llava_run, fx, capsys):
    out, _ = llava_run
    printed, want, _, _ = _predict_image(out, fx, capsys, "USER: <image>\nwhat color is it? ASSISTANT:")
    assert printed == want and printed  # the trained model says something


# -- one-line errors, before anything is written ------------------------------------------------------------------
def _one_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cache_request_is_a_one_line_error(dirs, fx, tmp_path, capsys):
    rc = _train(dirs["llava"], fx, tmp_path / "run", "--image-cache-dir", str(tmp_path / "cache"))
    assert rc == 2 and "--image-cache-dir" in _one_line(capsys) and not (tmp_path / "run").exists()
    assert not (tmp_path / "cache").exists()


def test_paligemma_nlvr2_is_a_one_line_error_naming_tasks(dirs, fx, tmp_path, capsys, monkeypatch):
    import vlpet.model

    def no_build(*a, **kw):
        raise AssertionError("the VLM was built")

    monkeypatch.setattr(vlpet.model, "load_backbone", no_build)  # refused from the config, before the weights
    rc = main(["train", "--backbone", str(dirs["paligemma"]), "--data-root", str(fx.data.root), "--image-root",
               str(fx.image_root), "--output", str(tmp_path / "run"), "--device", "cpu", "--no-progress"])
    err = _one_line(capsys)
    assert rc == 2 and "--tasks nlvr" in err and "PaliGemma" in err and not (tmp_path / "run").exists()


def test_predict_image_errors(llava_run, fx, tmp_path, capsys):
    out, _ = llava_run
    image = next(p for (s, _), p in fx.files.items() if s == "COCO")
    rc = main(["predict", "--checkpoint", str(out), "--image", str(image), "--question", " ", "--device", "cpu"])
    assert rc == 2 and "--question" in _one_line(capsys)
    rc = main(["predict", "--checkpoint", str(out), "--image", str(tmp_path / "nope.png"), "--question", "q?",
               "--device", "cpu"])
    assert rc == 2 and "nope.png" in _one_line(capsys)
