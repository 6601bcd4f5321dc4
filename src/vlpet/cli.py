"""`vlpet`: one command for the main jobs. Each sub-command is a thin shell over the library.

    vlpet demo                      the paper's experiment in miniature, offline (README's first command)
    vlpet train ...                 the multitask recipe on VL-Adapter-layout data
    vlpet evaluate / predict ...    scores (Table-2 row) / submission files from a run or adapter folder
    vlpet params ...                trainable / total / Params % of a preset on a backbone
    vlpet presets                   every named recipe
    vlpet features ...              grid features of a folder of images (HDF5, VL-Adapter layout)
    vlpet import-official ...       an official VL-PET checkpoint -> a vlpet adapter folder

Errors in the user's input print one line naming the file/option at fault (a traceback with --debug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _tasks(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _add_common_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="bart-base",
                   help="built-in offline architecture (bart-base, t5-base, florence2-base, florence2-large, "
                        "blip2-flan-t5-xl, smolvlm-2b, llava-1.5-7b: random weights; bart-base / t5-base come with "
                        "a byte-level stand-in tokenizer; nothing is downloaded), a Hugging Face id "
                        "(facebook/bart-base, florence-community/Florence-2-base, Salesforce/blip2-flan-t5-xl, "
                        "llava-hf/llava-1.5-7b-hf: the local cache first, then one try of the hub) or a local folder")
    p.add_argument("--method", "--recipe", dest="method", default="vl-pet-large",
                   help="preset name (see `vlpet presets`)")


def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-root", default=None, help="VLM runs: the images (default: the run's --image-root)")
    p.add_argument("--no-image-cache", dest="image_cache", action="store_false", default=None,
                   help="VLM runs: run the vision tower on every image instead of reading the run's feature cache")


def build_parser() -> argparse.ArgumentParser:
    from .data.tasks import task_names

    ap = argparse.ArgumentParser(prog="vlpet", description="VL-PET: vision-and-language parameter-efficient tuning "
                                 "via granularity control (ICCV 2023), on unmodified Hugging Face models: VL-BART / VL-T5, "
                                 "Florence-2, BLIP-2 / InstructBLIP and decoder-only VLMs.",
                                 epilog="`vlpet COMMAND --help` shows a command's options.")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    # Without a metavar argparse lists the commands in the usage line, so a bare `vlpet` shows them.
    sub = ap.add_subparsers(dest="command", required=True, title="commands")

    # params
    p = sub.add_parser("params", help="trainable / total parameters and Params %% of a preset")
    _add_common_model(p)
    p.add_argument("--video", action="store_true", help="the video-text setting (512-d frame features, spec §3.9)")
    p.add_argument("--feat-dim", type=int, default=None, help="visual feature size (default 2048; video 512)")
    p.add_argument("--json", action="store_true", help="print one JSON object {trainable, total, percent}")

    p = sub.add_parser("presets", help="list the named recipes with their Params %% (paper vs vlpet)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--backbones", default=None,
                   help="comma-separated backbones to tabulate instead of the paper's (e.g. florence2-base,"
                        "florence2-large,blip2-flan-t5-xl: Params %% of every preset there, offline)")

    # train
    p = sub.add_parser("train", help="train a preset with the paper's multitask recipe")
    p.add_argument("--config", default=None,
                   help="a recipe file (YAML/JSON, e.g. recipes/bart-base/vl-pet-large.yaml); options given on the "
                        "command line override it")
    p.add_argument("--backbone", default=None,
                   help="built-in offline architecture (bart-base, t5-base: random weights and a byte-level "
                        "stand-in tokenizer, never downloaded), a Hugging Face id (facebook/bart-base: local cache "
                        "first, one try of the hub) or a local folder (default bart-base)")
    p.add_argument("--method", "--recipe", dest="method", default=None,
                   help="preset name, see `vlpet presets` (default vl-pet-large)")
    p.add_argument("--data-root", default=None, help="folder in the VL-Adapter layout (vqa/, GQA/, nlvr/, COCO/ ...; "
                                                     "video/ in the VALUE layout for the video tasks)")
    p.add_argument("--tasks", type=_tasks, default=None,
                   help="comma-separated (default vqa,gqa,nlvr,caption; video: tvqa,how2qa,tvc,yc2c)")
    p.add_argument("--output", default=None, help="run folder (checkpoints, logs, results, plots)")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's (20)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="VQA batch per process; other tasks scale as in the paper (default: 500 BART, 300 T5); "
                        "video: the batch of every task (default 50 BART). Under torchrun with N processes the "
                        "global batch is N x this, split among the processes: N processes with B/N train on the "
                        "batches of one process with B")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--lr", type=float, default=None, help="default: the preset's")
    p.add_argument("--lr-schedule", default=None,  # checked by TrainConfig (vlpet.train.optim.LR_SCHEDULES)
                   help="after the warm-up: linear (decay to 0; default, the paper's) or constant")
    p.add_argument("--warmup-ratio", type=float, default=None,
                   help="share of the steps with a linearly rising lr, in [0, 1) (default 0.1)")
    p.add_argument("--seed", type=int, default=None, help="default 42; fixes init, dropout, answer sampling, "
                                                          "task order and data order")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None, help="default fp32")
    p.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps (default 1)")
    p.add_argument("--feat-dim", type=int, default=None, help="visual feature size (default: read from the data)")
    p.add_argument("--feature-dirname", default=None,
                   help="feature sub-folder under */clip_features/ (default data_clip_RN101_att)")
    p.add_argument("--unmasked-frames", dest="mask_padded_frames", action="store_false", default=None,
                   help="video: attend to the zero-padded frames as the official code does (default: masked)")
    p.add_argument("--visual-pool", type=int, default=None,
                   help="pool the 7x7 feature grid to NxN visual tokens (default 6, as the paper)")
    p.add_argument("--official-gqa-typo", action="store_true", default=None, help='use the official GQA prompt "gpa: "')
    p.add_argument("--official-ln-decay", action="store_true", default=None,
                   help="decay LayerNorm weights as the official optimizer does (spec §8.1.10)")
    p.add_argument("--no-repeat-ngram-size", dest="caption_no_repeat_ngram_size", type=int, default=None,
                   help="caption decoding (default 0); the official BART path inherits 3 from facebook/bart-base")
    p.add_argument("--caption-metrics", type=_tasks, default=None,
                   help="comma-separated caption metrics (default BLEU-4,METEOR,ROUGE-L,CIDEr; METEOR needs Java)")
    p.add_argument("--limit-train", type=int, default=None, help="first N examples per task (smoke runs)")
    p.add_argument("--limit-eval", type=int, default=None)
    p.add_argument("--save-every-steps", type=int, default=None, help="also checkpoint every N steps")
    p.add_argument("--no-eval", dest="eval_every_epoch", action="store_false", default=None,
                   help="skip per-epoch validation")
    p.add_argument("--no-test", dest="eval_test", action="store_false", default=None,
                   help="skip the final test evaluation")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader worker processes (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                   default=None, help="torch.compile mode with --compile (reduce-overhead: CUDA graphs)")
    p.add_argument("--compile-scope", choices=("auto", "model", "blocks"), default=None,
                   help="with --compile: model = one graph; blocks = each layer and vision block compiled in place "
                        "(BLIP-2 Flan-T5-XL's first step: 36 s on an H200; as one graph, not done after 4.5 min); "
                        "auto (default) = blocks for Florence-2 / BLIP-2 / InstructBLIP unless --compile-mode "
                        "reduce-overhead, else model")
    p.add_argument("--memory-budget", type=float, default=None,
                   help="with --compile: activation memory budget in (0, 1] (lower recomputes more, saves memory)")
    p.add_argument("--recompute", action="store_true", default=None,
                   help="recompute the PET modules' activations in the backward instead of storing them: less "
                        "memory, somewhat slower (VL-BART-base vl-pet-large, compiled: 1.08x the frozen floor's "
                        "memory instead of 1.32x, at +7%% step time)")
    p.add_argument("--sdpa", choices=("efficient-first", "default"), default=None,
                   help="attention kernel order (default efficient-first: faster than cuDNN's at the VL encoder's "
                        "short padded sequences; default = PyTorch's own choice)")
    p.add_argument("--frozen-dtype", choices=("auto", "fp32", "bf16"), default=None,
                   help="storage dtype of the frozen backbone (default auto: bf16 with --precision bf16, else fp32; "
                        "trainable tensors always stay fp32)")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue the run in --output from its newest checkpoint")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing run in --output")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--image-root", default=None,
                   help="raw images for a VLM backbone (Florence-2, BLIP-2, InstructBLIP, LLaVA, Idefics3, Qwen2-VL, "
                        "PaliGemma), read through its own processor "
                        "instead of feature files: IMAGES/coco/{train,val}2014/, IMAGES/gqa/images/, "
                        "IMAGES/nlvr2/images/{train,dev,test1}/ (.jpg or .png)")
    p.add_argument("--no-image-cache", dest="image_cache", action="store_false", default=None,
                   help="with --image-root: run the frozen vision tower every step instead of computing its "
                        "features once per image and reading them from disk (the default when it is frozen)")
    p.add_argument("--image-cache-dir", default=None,
                   help="folder of the image feature cache (default $VLPET_CACHE/image-features, "
                        "~/.cache/vlpet/image-features)")

    # evaluate / predict
    p = sub.add_parser("evaluate", help="score a run or adapter folder; prints a Table-2 row")
    p.add_argument("--checkpoint", required=True, help="a run folder (its adapter-last and adapter-best) or an adapter folder")
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", default="test", help="test (default), val, or a file split such as karpathy_test")
    p.add_argument("--tasks", type=_tasks, default=None, help="default: the run's tasks")
    p.add_argument("--backbone", default=None, help="override the backbone stored in the adapter folder")
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--feature-dirname", default=None)
    p.add_argument("--limit", type=_positive_int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--output", default=None, help="results JSON (default: <checkpoint>/eval-<split>.json)")
    p.add_argument("--unmasked-frames", action="store_true", default=None,
                   help="video: attend to padded frames (default: as the run was trained)")
    p.add_argument("--caption-metrics", type=_tasks, default=None,
                   help="comma-separated caption metrics (default: the run's, else BLEU-4,METEOR,ROUGE-L,CIDEr)")
    _add_image_options(p)

    p = sub.add_parser("predict", help="write predictions in the official submission format, or answer one "
                                       "question about one image (--image --question)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--image", default=None, help="one image file: print the answer to --question (VLM runs)")
    p.add_argument("--question", default=None, help="with --image: the question (--task caption: none)")
    p.add_argument("--data-root", default=None, help="the data to predict (required without --image)")
    p.add_argument("--task", default=None, choices=task_names(),
                   help="required without --image; with --image: vqa (default), gqa or caption")
    p.add_argument("--split", default="test")
    p.add_argument("--output", default=None, help="(required without --image) FILE.json (NLVR2: FILE.csv also accepted; video: VALUE's .json "
                                                    "/ .jsonl format, and a folder gets VALUE's file name)")
    p.add_argument("--unmasked-frames", action="store_true", default=None,
                   help="video: attend to padded frames (default: as the run was trained)")
    p.add_argument("--backbone", default=None)
    p.add_argument("--batch-size", type=_positive_int, default=100)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--feature-dirname", default=None)
    p.add_argument("--limit", type=_positive_int, default=None)
    p.add_argument("--device", default=None)
    _add_image_options(p)

    # features
    p = sub.add_parser("features", help="grid features of images -> one HDF5 file per image")
    p.add_argument("--images", required=True, help="folder of images (img_id = file name without extension)")
    p.add_argument("--output", required=True, help="output folder, e.g. DATA/COCO/clip_features/data_clip_RN101_att")
    p.add_argument("--encoder", default="clip-rn101", help="clip-rn101 (needs vlpet[clip]) or efficientnet-lite0 (offline)")
    p.add_argument("--batch-size", type=int, default=32)

    # import-official
    p = sub.add_parser("import-official", help="official VL-PET checkpoint (LAST.pth) -> vlpet adapter folder")
    p.add_argument("checkpoint", help="the official LAST.pth (a full state_dict; loaded with weights_only=True)")
    p.add_argument("--backbone", default="facebook/bart-base",
                   help="the pretrained backbone the official run used (its frozen weights are not in the adapter)")
    p.add_argument("--method", default="auto",
                   help="preset (vl-pet-small|middlex|middley|large); 'auto' reads the granularity off the gate names")
    p.add_argument("--output", required=True)
    p.add_argument("--strict", action="store_true", help="fail on any missing or unexpected key")

    # demo
    p = sub.add_parser("demo", help="the paper's experiment in miniature: offline, real images, real image encoder")
    p.add_argument("--output", default="vlpet-demo", help="output folder (default: ./vlpet-demo)")
    p.add_argument("--method", default="vl-pet-large", help="preset to train (default vl-pet-large)")
    p.add_argument("--compare", action="store_true",
                   help="also run full, lora, vl-adapter and vl-pet small/middleX/middleY/large on the same budget")
    p.add_argument("--methods", type=_tasks, default=None, help="comma-separated list instead of --compare's")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the data set, the PLM's pretraining and the tuning (default 0)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="tuning steps over the three tasks (default 1,200: the 10-minute CPU budget; VL-PET-large "
                        "learns easy-VQA's colour questions only with several times more, see docs/demo/why-not-95.md)")
    p.add_argument("--epochs", type=int, default=None,
                   help="at most this many epochs (default 20); the run also stops at --max-steps, which comes first "
                        "with the default data")
    p.add_argument("--vqa-train-images", type=int, default=None,
                   help="easy-VQA train images whose questions form the VQA train split (default 1,000, the images "
                        "the other two tasks use; at most 3,900)")
    p.add_argument("--quick", action="store_true", help="a tiny version (a few dozen images, tiny model): about a minute")
    p.add_argument("--cache", default=None, help="cache folder for data, features and the pretrained PLM "
                                                 "(default $VLPET_CACHE or ~/.cache/vlpet)")
    p.add_argument("--no-progress", action="store_true")
    return ap


# -- commands ------------------------------------------------------------------------------------

def cmd_params(a) -> int:
    from .model import VLModel

    model = VLModel.build(a.backbone, a.method, video=a.video, feat_dim=a.feat_dim, meta=True, load_tok=False)
    t, n = model.parameter_counts()
    pct = 100 * t / n
    if a.json:
        print(json.dumps({"backbone": a.backbone, "method": a.method, "video": a.video, "trainable": t, "total": n,
                          "percent": round(pct, 6)}))
    else:
        print(f"{a.method} on {a.backbone}{' (video)' if a.video else ''}: trainable {t:,} / total {n:,} "
              f"= {pct:.3f}%")
    return 0


def cmd_presets(a) -> int:
    from .model import VLModel
    from .presets import PAPER_PARAMS_PERCENT, PRESETS, get_preset

    if a.backbones:
        return _presets_on(a, [b.strip() for b in a.backbones.split(",") if b.strip()])
    rows = []
    for name in PRESETS:
        row = {"preset": name, "description": get_preset(name).description}
        for bb, fam in (("bart-base", "bart"), ("t5-base", "t5")):
            t, n = VLModel.build(bb, name, meta=True, load_tok=False).parameter_counts()
            row[f"{fam}_percent"] = 100 * t / n
            row[f"{fam}_paper"] = PAPER_PARAMS_PERCENT[fam].get(name)
        rows.append(row)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| preset | BART-base % (paper) | T5-base % (paper) | what it trains |")
    print("|---|---|---|---|")
    for r in rows:
        fmt = lambda v, p: f"{v:.2f} ({p:.2f})" if p is not None else f"{v:.2f} (-)"  # noqa: E731
        print(f"| {r['preset']} | {fmt(r['bart_percent'], r['bart_paper'])} | {fmt(r['t5_percent'], r['t5_paper'])} "
              f"| {r['description']} |")
    return 0


def _presets_on(a, backbones: list[str]) -> int:
    """Params % of every preset on the given backbones (meta device: no weights, no network for built-ins)."""
    from .model import VLModel
    from .errors import ConfigError
    from .presets import PRESETS

    rows = []
    for name in PRESETS:
        row = {"preset": name}
        for bb in backbones:
            try:
                model = VLModel.build(bb, name, meta=True, load_tok=False)
            except ConfigError:  # a preset not offered on this backbone (decoder-only VLMs, issue 20)
                row[bb] = None
                continue
            t, n = model.parameter_counts()
            row[bb] = {"trainable": t, "total": n, "percent": 100 * t / n}
        rows.append(row)
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| preset | " + " | ".join(backbones) + " |")
    print("|---|" + "---|" * len(backbones))
    for r in rows:
        print(f"| {r['preset']} | " + " | ".join("-" if r[bb] is None else f"{r[bb]['percent']:.2f}"
                                                for bb in backbones) + " |")
    return 0


def train_keys() -> tuple[str, ...]:
    """The TrainConfig fields a `vlpet train` flag may set: all but `debug` (the top-level --debug, passed on its
    own). Read from the dataclass, so a new field needs only its flag."""
    import dataclasses

    from .train.loop import TrainConfig

    return tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "debug")


def cmd_train(a) -> int:
    from .train.loop import train
    from .train.recipes import build_train_config

    cli = {k: getattr(a, k) for k in train_keys() if getattr(a, k, None) is not None}
    train(build_train_config(a.config, cli, debug=a.debug))
    return 0


def cmd_evaluate(a) -> int:
    from .train.runs import evaluate_checkpoint

    evaluate_checkpoint(a.checkpoint, a.data_root, split=a.split, tasks=a.tasks, backbone=a.backbone,
                        batch_size=a.batch_size, precision=a.precision, feature_dirname=a.feature_dirname,
                        limit=a.limit, device=a.device, output=a.output, unmasked_frames=a.unmasked_frames,
                        caption_metrics=a.caption_metrics, image_root=a.image_root, image_cache=a.image_cache)
    return 0


def cmd_predict(a) -> int:
    from .errors import ConfigError
    from .train.runs import predict_checkpoint

    if a.image is not None:
        from .train.native import answer

        if a.data_root or a.output:
            raise ConfigError("--image answers one question and prints it; --data-root / --output are for "
                              "predicting a whole split")
        print(answer(a.checkpoint, a.image, a.question or "", task=a.task or "vqa", backbone=a.backbone,
                     device=a.device, precision=a.precision))
        return 0
    missing = [o for o, v in (("--data-root", a.data_root), ("--task", a.task), ("--output", a.output)) if not v]
    if missing:
        raise ConfigError(f"predict: {', '.join(missing)} required (or --image IMAGE --question TEXT for one answer)")

    predict_checkpoint(a.checkpoint, a.data_root, a.task, a.output, split=a.split, backbone=a.backbone,
                       batch_size=a.batch_size, precision=a.precision, feature_dirname=a.feature_dirname,
                       limit=a.limit, device=a.device, unmasked_frames=a.unmasked_frames, image_root=a.image_root,
                       image_cache=a.image_cache)
    return 0


def cmd_features(a) -> int:
    from .features.extract import extract_features

    summary = extract_features(a.images, a.output, encoder=a.encoder, batch_size=a.batch_size)
    print(json.dumps(summary, default=str))
    return 0


def cmd_import_official(a) -> int:
    from .official import import_official

    _, report = import_official(a.checkpoint, a.backbone, None if a.method == "auto" else a.method,
                                output_dir=a.output, strict=a.strict)
    print(f"imported {len(report['mapped'])} tensors into {a.output}; missing {len(report['missing'])}, "
          f"unexpected {len(report['unexpected'])}")
    for key in ("missing", "unexpected"):
        for name in report[key][:20]:
            print(f"  {key}: {name}")
    return 0


def cmd_demo(a) -> int:
    from .demo.run import run_demo

    run_demo(output=a.output, method=a.method, compare=a.compare, methods=a.methods, seed=a.seed, epochs=a.epochs,
             quick=a.quick, cache=a.cache, progress=not a.no_progress, max_steps=a.max_steps,
             vqa_train_images=a.vqa_train_images)
    return 0


COMMANDS = {"params": cmd_params, "presets": cmd_presets, "train": cmd_train, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "features": cmd_features, "import-official": cmd_import_official,
            "demo": cmd_demo}


def main(argv=None) -> int:
    ap = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # bare `vlpet`: show the commands, not just argparse's "required: command"
        ap.print_help()
        return 2
    a = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .errors import VLPetError

    try:
        rc = COMMANDS[a.command](a)
        sys.stdout.flush()  # a closed pipe surfaces here, inside the handler, not at interpreter exit
        return rc
    except BrokenPipeError:
        # `vlpet presets | head`: the reader left; stop quietly (Python's documented recipe: point
        # stdout at devnull so the interpreter's final flush does not raise again).
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (in-process capture)
            pass
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe
    except VLPetError as exc:
        if a.debug:
            raise
        print(f"vlpet {a.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vlpet {a.command}: interrupted; `vlpet train --resume` continues from the newest checkpoint",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
