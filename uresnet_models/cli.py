"""The ``uresnet`` command line: ``demo | train | eval | predict | export | bench | list-models``.

    uresnet demo                       # environment, op checks and speed, a short training run
    uresnet train --data synthetic --epochs 5 --out runs/shapes
    uresnet eval --checkpoint runs/shapes --data synthetic
    uresnet predict --checkpoint runs/shapes --input photos/ --out masks/
    uresnet export --checkpoint runs/shapes --format onnx --dynamic --out shapes.onnx
    uresnet bench --op pixel_shuffle_bn --no-compile
    python -m uresnet demo             # the same without the console script

This module parses the arguments and calls the module that does the work (demo, train,
predict, export, benchmark). torch is imported inside the commands so that ``--help`` stays
fast. Errors a user can fix (:class:`~uresnet_models.errors.UsageError`: bad arguments, paths)
end with one line on stderr and exit status 2 (``URESNET_DEBUG=1`` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .constants import DEFAULT_ENCODER, EXPORT_FORMATS, FORMATS, LOSSES, MODES, OPS, TORCHVISION_DATASETS
from .errors import UsageError


def _say(*parts) -> None:
    print(*parts, flush=True)  # flushed: a long command's progress shows through a pipe


def _device(name: str | None):
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here")
    return torch.device(name)


def _device_name(device) -> str:
    from uresnet_ops.timing import device_name
    return device_name(device)


def _set_threads(n: int | None) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


def _check_folder_of(flag: str, path: str | None) -> None:
    """An output file's folder must exist before the work starts, not only when it is written."""
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UsageError(f"{flag} {path}: the folder does not exist")


def _write_json(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path}")


def _config(cls, args):
    """``cls`` (a dataclass) from the parsed arguments named as its fields, a ``--no-X`` flag
    giving ``X=False``."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
        elif hasattr(args, f"no_{f.name}"):
            values[f.name] = not getattr(args, f"no_{f.name}")
    return cls(**values)


# --------------------------------------------------------------------------- commands
def cmd_demo(args) -> int:
    from .demo import run_demo
    _set_threads(args.threads)
    return run_demo(args, _device(args.device))


def cmd_bench(args) -> int:
    import torch
    from uresnet_ops import testing

    from . import benchmark
    device = _device(args.device)
    _check_folder_of("--json", args.json)
    size = args.size or ("full" if device.type == "cuda" else "small")
    load = benchmark.machine_load()  # before our own work adds to it
    if args.models is not None:  # the whole-model benchmark: plain vs fused (and compiled), train and infer
        known = [n for n, _ in benchmark.MODELS + benchmark.EXTRA_MODELS]
        models = args.models.split(",") if args.models else [n for n, _ in benchmark.MODELS]
        unknown = sorted(set(models) - set(known))
        if unknown:
            raise UsageError(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
        compile = args.compile or (benchmark.compile_by_default(device) and not args.no_compile)
        _say(f"uresnet bench --models: train step (forward + backward + Adam) and inference forward, plain "
             f"(create_model(fused=False)) vs fused (and folded for inference)"
             f"{' and torch.compile of each' if compile else ''}, "
             f"{device.type} ({_device_name(device)}), size {size}, {torch.get_num_threads()} thread(s)")
        rows = benchmark.measure_models(device, size, rounds=args.rounds, models=models, compile=compile, out=_say)
        _say("(x = plain time / time, >1 is faster; peak = the train step's own peak allocations; saved = "
             "what is alive when the forward ends, the activations kept for the backward; fused/plain = fused / plain)")
        notes = benchmark.noise_notes(load, [r["spread"] for r in rows], args.rounds)
        for note in notes:
            _say(f"note: {note}")
        _write_json(args.json, {"device": _device_name(device), "size": size, "rounds": args.rounds, "models": rows,
                                "compile": compile, "threads": torch.get_num_threads(), "load_average": load,
                                "notes": notes})
        return 0
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        print(f"note: {args.dtype} on CPU is slow and not what the kernels are tuned for", file=sys.stderr)
    ops = OPS if args.op == "all" else (args.op,)
    modes = MODES if args.mode == "all" else (args.mode,)
    print(f"uresnet bench: {device.type} ({_device_name(device)}), {args.dtype}, size {size}")
    rows = []
    for op in ops:
        baselines = [testing.EAGER] + ([] if args.no_compile else [testing.COMPILED])
        impls = testing.runnable_backends(op, device.type) + baselines
        for mode in modes:
            if mode not in testing.op_modes(op):
                continue
            rows += benchmark.time_impls(op, impls, benchmark.SHAPES[size][op], device, dtype, mode,
                                         min_time=args.min_time, repeats=args.repeats)
    benchmark.print_op_table(rows)
    notes = benchmark.noise_notes(load, [r["spread"] for r in rows], args.repeats)
    for note in notes:
        print(f"note: {note}")
    _write_json(args.json, {"device": _device_name(device), "dtype": args.dtype, "size": size, "results": rows,
                            "load_average": load, "notes": notes})
    return 0


def _quiet_cpp_extension_log() -> None:
    """torch.compile imports torch.utils.cpp_extension, which logs "No CUDA runtime is found,
    using CUDA_HOME=..." on a machine with a CUDA toolkit but no GPU: about building CUDA
    extensions, nothing to do with a CPU compile, so not shown there."""
    import logging

    import torch
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def cmd_train(args) -> int:
    from .train import TrainConfig, fit
    _set_threads(args.threads)
    if args.compile:
        _quiet_cpp_extension_log()
    fit(_config(TrainConfig, args))
    return 0


def _eval_config(meta: dict, args):
    """The training config of a checkpoint with the data options of this command."""
    from .train import TrainConfig
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in meta.get("config", {}).items() if k in known}
    overrides = dict(workers=args.workers, device=args.device, resume=None)  # resume: the run may be gone
    if args.data is not None:
        overrides.update(data=args.data, format=args.format, dataset=args.dataset, download=False)
        if args.format not in (None, "synthetic"):
            overrides["task"] = None  # the dataset's own
    elif args.format or args.dataset:
        raise UsageError(f"--{'format' if args.format else 'dataset'} needs --data")
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    return TrainConfig(**{**saved, **overrides})


def cmd_eval(args) -> int:
    import torch
    from torch.utils.data import DataLoader
    from .checkpoint import load_checkpoint
    from .plots import class_names
    from .train import Task, build_data, evaluate, loader_workers
    if not os.path.exists(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint}: no such folder")
    _check_folder_of("--json", args.json)
    device = _device(args.device)
    model, saved_info, meta = load_checkpoint(args.checkpoint, device)
    cfg = _eval_config(meta, args)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    pre = model.preprocessing  # normalised as in training (the checkpoint's own)
    dataset, info = build_data(cfg, args.split, train_transform=False, normalization=(pre["mean"], pre["std"]))
    if (info.num_classes, info.task) != (saved_info.num_classes, saved_info.task):
        raise UsageError(f"the checkpoint predicts {saved_info.num_classes} classes ({saved_info.task}) but "
                         f"{cfg.format} has {info.num_classes} ({info.task})")
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=loader_workers(cfg))
    _say(f"evaluating {args.checkpoint} ({model.model_config['architecture']}, epoch {meta.get('epoch')}) on "
         f"{cfg.format} {args.split}: {len(dataset)} samples")
    metrics = evaluate(model, loader, Task(info, cfg), device, amp=args.amp, channels_last=args.channels_last,
                       progress=not args.no_progress)
    print(f"loss {metrics['loss']:.4f}  " + "  ".join(f"{k} {metrics[k]:.4f}" for k in
                                                     ("miou", "iou_foreground", "mdice", "dice_foreground", "pixel_acc",
                                                      "top1", "top5") if k in metrics))
    from .train import undefined_foreground
    if undefined_foreground(metrics):
        print(f"note: {undefined_foreground(metrics)}")
    if "iou_foreground" in metrics:
        print("(miou: the mean of the background and foreground IoU; iou_foreground: the foreground's alone, what "
              "torchmetrics' and smp's binary IoU report)")
    if "iou" in metrics:
        print(f"{'class':<20} {'IoU':>7} {'Dice':>7}")
        for name, iou, dice in zip(class_names(info, len(metrics["iou"])), metrics["iou"], metrics["dice"]):
            print(f"{name:<20} {iou:>7.4f} {dice:>7.4f}")
    if "confusion_matrix" in metrics:
        names = class_names(info, len(metrics["class_accuracy"]))
        width = max(6, *(len(n) for n in names)) + 1
        print(f"{'class':<20} {'accuracy':>8}   confusion matrix (rows: true class, columns: predicted)")
        print(" " * 31 + "".join(f"{n[:width - 1]:>{width}}" for n in names))
        for name, acc, row in zip(names, metrics["class_accuracy"], metrics["confusion_matrix"]):
            print(f"{name:<20} {acc:>8.4f}  " + "".join(f"{v:>{width}}" for v in row))
    _write_json(args.json, {"checkpoint": args.checkpoint, "format": cfg.format, "split": args.split, **metrics})
    return 0


def cmd_predict(args) -> int:
    from .predict import predict
    rows, failed = predict(args.checkpoint, args.input, args.out, depth=args.depth, image_size=args.image_size,
                           color=args.color, batch_size=args.batch_size, device=_device(args.device),
                           progress=not args.no_progress, strict=args.strict, log=_say)
    if failed:
        print(f"uresnet predict: {len(failed)} of {len(rows) + len(failed)} image(s) failed (listed above)",
              file=sys.stderr)
        return 1
    return 0


def cmd_export(args) -> int:
    from .export import export_checkpoint
    export_checkpoint(args.checkpoint, args.out, args.format, image_size=args.image_size, dynamic=args.dynamic,
                      include_preprocessing=args.include_preprocessing, log=_say)
    return 0


def cmd_list_models(args) -> int:
    import inspect

    import uresnet_models
    names = uresnet_models.list_models(args.pattern)
    if not names:
        print(f"no models match {args.pattern!r}")
        return 0
    if not args.params:
        for name in names:
            print(name)
        return 0
    print(f"{'model':<18} {'default encoder':<18} {'parameters':>12}")
    for name in names:
        try:  # built on the meta device: no memory, no initialisation
            count = uresnet_models.count_parameters(name)
            default = inspect.signature(uresnet_models.model_entrypoint(name)).parameters.get("encoder")
            encoder = "-" if default is None or default.default is None else str(default.default)
            encoder = "(own)" if default is not None and default.default is None else encoder
            print(f"{name:<18} {encoder:<18} {count / 1e6:>11.2f}M")
        except Exception as error:  # noqa: BLE001 - a broken plugin must not hide the others
            print(f"{name:<18} {'?':<18} {'error: ' + str(error)[:60]:>12}")
    return 0


# --------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """Errors as one line (no usage block, no traceback), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = _Parser(prog="uresnet", description="Fused U-Net/ResNet ops and models: demo, training, evaluation, "
                     "inference and benchmarks.")
    parser.add_argument("--version", action="version", version=f"uresnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for add in (_add_demo_parser, _add_train_parser, _add_eval_parser, _add_predict_parser, _add_export_parser,
                _add_bench_parser, _add_list_models_parser):
        add(sub)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _image_size(text: str):
    """``64`` or ``HxW`` (argparse type)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or HxW, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or HxW with positive sizes, got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _encoder(text: str) -> str | None:
    """``--encoder``: a timm name, or None for "none" (the seed's own encoder)."""
    return None if text.lower() == "none" else text


class _ModelArg(argparse.Action):
    """``--model-arg KEY=VALUE``, repeatable, into one dict; values are Python literals (8,
    (16, 32), True) or else strings."""

    def __call__(self, parser, namespace, item, option_string=None):
        import ast
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            parser.error(f"--model-arg {item!r}: expected KEY=VALUE, e.g. base_channels=16")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass
        setattr(namespace, self.dest, {**getattr(namespace, self.dest), key: value})


def _add_device(parser) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")


def _add_amp(parser) -> None:
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast dtype (default none)")


def _add_dataset(parser) -> None:
    parser.add_argument("--dataset", metavar="NAME", help=f"--format torchvision: {', '.join(TORCHVISION_DATASETS)}; "
                        "MNIST and FashionMNIST also read a folder of their four IDX files, gzipped or not (e.g. "
                        "/usr/share/datasets/fashion-mnist)")


def _add_checkpoint(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a run folder (its best/ is used) or a checkpoint folder")


def _add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="environment, op checks and speed, then a short training run (no downloads)",
                       description="Environment, op correctness and speed, then trains a small U-ResNet on synthetic "
                       "shapes for about a minute (CPU), reports IoU, writes samples.png and curves.png to --out, "
                       "and times a train step with the fused ops vs the reference ones.")
    _add_device(p)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the reference (slow on CPU)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--epochs", type=_positive_int, default=5, help="training epochs (32 steps each; default 5)")
    p.add_argument("--out", default="uresnet-demo", help="folder for the checkpoint, logs and PNGs (default: "
                   "./uresnet-demo)")
    p.add_argument("--speed-rounds", type=_positive_int, default=5, help="timed train steps per implementation "
                   "(default 5)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads (default: torch's, one per core; on cores "
                   "busy with other jobs 1 can be several times faster)")
    p.set_defaults(func=cmd_demo)


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a segmentation or classification model",
                       description="Train a model on a dataset read from a local folder (or synthetic shapes). "
                       "Writes best/ and last/ checkpoints, log.csv, log.json, curves.png and samples.png to --out. "
                       "Several processes: torchrun --nproc_per_node=N -m uresnet train ... (DDP, --batch-size "
                       "per process).")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="uresnet", help="registered name (uresnet list-models); default uresnet")
    g.add_argument("--encoder", type=_encoder, default=DEFAULT_ENCODER,
                   help="timm encoder name, or 'none' for the seed's own; default: the model's")
    g.add_argument("--model-arg", action=_ModelArg, dest="model_args", default={}, metavar="KEY=VALUE",
                   help="extra create_model argument, repeatable (e.g. base_channels=16, upsample=eucb_star, "
                   "encoder_kwargs={'dynamic_img_size':True})")
    g.add_argument("--pretrained", action="store_true", help="start from the timm encoder's pretrained weights "
                   "(downloaded once, then cached); the images are normalised as those weights expect")
    g.add_argument("--freeze-encoder", action="store_true", help="train only the decoder and heads (the encoder's "
                   "weights and BatchNorm statistics stay as they are; usually with --pretrained)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", help="dataset folder, or 'synthetic' (default)")
    g.add_argument("--format", choices=FORMATS, help="layout of --data (default: synthetic); binary and masks: "
                   "images/ + masks/ with the same file names (or train/ and val/ holding both), binary masks 0/1 or "
                   "0/255, masks PNGs of class ids; torchvision: the torchvision.datasets class --dataset reads "
                   "--data (cifar10: the same as --format torchvision --dataset CIFAR10)")
    _add_dataset(g)
    g.add_argument("--download", action="store_true", help="--format torchvision: let torchvision download the "
                   "dataset into --data (never done otherwise)")
    g.add_argument("--task", choices=("seg", "cls", "joint"), help="synthetic only: segmentation (default), "
                   "classification, or both (a model with an aux classification head)")
    g.add_argument("--num-classes", type=_positive_int, help="synthetic: classes incl. background (2-4); binary: 1 "
                   "(sigmoid, default) or 2 (softmax); masks (required): the class ids 0..K-1 in the masks")
    g.add_argument("--ignore-index", type=int, default=255, help="masks: the mask value of unlabelled pixels, left "
                   "out of the loss and the metrics (default 255)")
    g.add_argument("--image-size", type=_image_size, default=64, help="N or HxW: training crop / eval resize "
                   "(default 64)")
    g.add_argument("--train-samples", type=_positive_int, help="synthetic training set size (default 256); other "
                   "data: a seeded random subset of this many (default: all)")
    g.add_argument("--val-samples", type=_positive_int, help="synthetic validation set size (default 64); other data: "
                   "a seeded random subset of this many (default: all)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="held out when the folder has no train/ and "
                   "val/ (default 0.1)")
    g.add_argument("--no-augment", action="store_true", help="no flip, brightness/contrast or random crop")
    g.add_argument("--no-data-check", action="store_true", dest="no_check_data",  # TrainConfig.check_data
                   help="skip reading every file once before training (sizes, readability, label range)")
    g.add_argument("--workers", type=int, help="data loader processes (default 0 for synthetic, else up to 4)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=10, help="default 10")
    g.add_argument("--batch-size", type=int, default=8, help="per process (default 8)")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4, the seeds'); the peak "
                   "of --schedule onecycle")
    g.add_argument("--schedule", choices=("plateau", "onecycle"), default="plateau", help="plateau: halve the lr "
                   "when validation stalls (ReduceLROnPlateau, default); onecycle: OneCycleLR over all the steps")
    g.add_argument("--weight-decay", type=float, default=0.0, help="default 0")
    g.add_argument("--optimizer", choices=("adam", "adamw"), default="adam", help="default adam")
    g.add_argument("--loss", choices=LOSSES,
                   help="segmentation loss (default: ce; bce_dice for one binary channel); focal, tversky and "
                   "lovasz (hinge for one channel, softmax otherwise) with their default parameters")
    g.add_argument("--bce-weight", type=float, default=0.5, help="BCE share of bce_dice (default 0.5)")
    g.add_argument("--aux-weight", type=float, default=0.4, help="weight of the classification loss of --task joint")
    g.add_argument("--steps-per-epoch", type=_positive_int, help="cap on training steps per epoch")
    g.add_argument("--plateau-patience", type=int, default=3, help="ReduceLROnPlateau patience (epochs; default 3)")
    g.add_argument("--plateau-factor", type=float, default=0.5, help="ReduceLROnPlateau factor (default 0.5)")
    g.add_argument("--early-stop", type=int, default=0, metavar="EPOCHS",
                   help="stop after this many epochs without improvement (default 0: never)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/uresnet", help="output folder (default runs/uresnet)")
    g.add_argument("--resume", nargs="?", const="auto", metavar="RUN",
                   help="continue a run from its last/ checkpoint (default: the one in --out)")
    g.add_argument("--overwrite", action="store_true", help="replace the run --out holds (without it or --resume, "
                   "train refuses an --out that holds one)")
    _add_amp(g)
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    _add_device(g)
    g.add_argument("--seed", type=int, default=0, help="data order, augmentation and initialisation (default 0)")
    g.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    g.add_argument("--threads", type=_positive_int, help="CPU threads per process (default: torch's)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def _add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="metrics of a checkpoint on a dataset",
                       description="Loss, IoU per class and mean, Dice, pixel accuracy (segmentation) or top-1 "
                       "(classification) of a checkpoint on a dataset split. The data options default to the "
                       "ones the checkpoint was trained with.")
    _add_checkpoint(p)
    p.add_argument("--data", help="dataset folder or 'synthetic' (default: the training data)")
    p.add_argument("--format", choices=FORMATS)
    _add_dataset(p)
    p.add_argument("--split", choices=("train", "val"), default="val")
    p.add_argument("--image-size", type=_image_size, help="resize to N or HxW (default: the training size)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="default 8")
    p.add_argument("--workers", type=int)
    _add_amp(p)
    p.add_argument("--channels-last", action="store_true")
    _add_device(p)
    p.add_argument("--json", metavar="PATH", help="also write the metrics as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="run a checkpoint on images: masks as PNG (or classes as CSV)",
                       description="Writes one PNG per input image to --out: class ids (0/255 for a one-channel "
                       "binary model), or colours with --color; classifiers print the class and write "
                       "predictions.csv. Images are normalised as in training (the checkpoint's preprocessing). "
                       "An image that cannot be read is skipped and listed at the end, and the exit status is 1.")
    _add_checkpoint(p)
    p.add_argument("--input", required=True, help="an image or a folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--depth", help="folder of depth maps with the images' names (RGB-D checkpoints)")
    p.add_argument("--image-size", type=_image_size, help="model input size (default: the training size); "
                   "masks are written at the image's own size")
    p.add_argument("--color", action="store_true", help="write colour masks instead of class ids")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="images per forward pass (default 8; "
                   "consecutive images of the same model-input size are batched)")
    _add_device(p)
    p.add_argument("--strict", action="store_true", help="stop at the first image that cannot be read (default: "
                   "skip it, list it at the end and exit with status 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)


def _add_export_parser(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint to ONNX, a torch.export program or an AOTInductor package",
                       description="Writes the checkpoint's model (eval mode) with the fused ops lowered to standard "
                       "ops: onnx (onnxruntime, TensorRT, OpenVINO), pt2 (torch.export.load) or aoti (AOTInductor "
                       "package, CPU; slow to compile). None needs uresnet to load. Then runs the file on a random "
                       "input and prints the largest difference from eager PyTorch.")
    _add_checkpoint(p)
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--image-size", type=_image_size, help="the example input's N or HxW (default: the training "
                   "size); without --dynamic the only size the file takes")
    p.add_argument("--dynamic", action="store_true", help="any batch size and any H, W (one file for all sizes)")
    p.add_argument("--include-preprocessing", nargs="?", const="uint8", choices=("uint8", "float"),
                   help="put the input normalisation in the graph: it then takes images as uint8 0..255 (the "
                   "default) or float in [0, 1]; without it the file takes normalised input. Either way "
                   "<out name>.preprocessing.json beside the file says what it takes")
    p.set_defaults(func=cmd_export)


def _add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="quick timing of every backend vs the eager and compiled reference",
                       description="Median time of each op on every backend that runs here, next to the eager "
                       "reference chain and torch.compile of it (ratios: >1 is faster than the baseline), each "
                       "measured --repeats times with its spread, and a note when the machine was busy; with "
                       "--models, whole models: a training step and an inference forward of the fused model vs "
                       "its plain PyTorch twin (create_model(fused=False)), with their training memory (the peak, "
                       "and what the forward saves for the backward). The full benchmark set is pytest "
                       "benchmarks/ (see benchmarks/README.md).")
    p.add_argument("--op", choices=("all", *OPS), default="all", help="default: all")
    _add_device(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="default: float32")
    p.add_argument("--size", choices=("small", "full"), help="default: full on CUDA, small on CPU")
    p.add_argument("--mode", choices=("all", *MODES), default="train_fwd", help="default: train_fwd")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per measurement "
                   "(default 0.3)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="measurements per case, the implementations "
                   "interleaved; the table shows their median and spread (default 3)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference (with --models: "
                   "of the models, on CUDA)")
    p.add_argument("--compile", action="store_true", help="--models on CPU: also torch.compile the plain and the "
                   "fused model (off by default there: minutes per model and shape)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--models", nargs="?", const="", metavar="NAMES",
                   help="instead of the ops: the whole-model benchmark (plain vs fused, train and inference, "
                        "batch 1 and 8) of these comma-separated models (default: the seeds resunet_atrous, "
                        "deresunet, uresnet; also unet, resunet)")
    p.add_argument("--rounds", type=_positive_int, default=3, help="timed steps per model, mode, shape and "
                   "implementation, interleaved (--models; default 3)")
    p.set_defaults(func=cmd_bench)


def _add_list_models_parser(sub) -> None:
    p = sub.add_parser("list-models", help="registered model names (with --params: parameter counts)")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard, e.g. '*resunet*'")
    p.add_argument("--params", action="store_true", help="show the default encoder and parameter count "
                   "(num_classes=1) of each model")
    p.set_defaults(func=cmd_list_models)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    if os.environ.get("URESNET_DEBUG"):
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, LookupError, RuntimeError, FileNotFoundError) as error:
        # bad arguments (UsageError), model arguments, dataset layouts, files missing or damaged (DataError),
        # checkpoints that do not fit
        return _fail(args, error, 2)
    except OSError as error:
        return _fail(args, error, 1)
    except KeyboardInterrupt:
        print(f"\nuresnet {args.command}: interrupted", file=sys.stderr)
        return 130


def _fail(args, error: Exception, status: int) -> int:
    """One line on stderr. A data-loader worker's error carries the worker traceback in its
    message: its last line is the original error."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    text = lines[-1].strip() if "Original Traceback" in str(error) else lines[0]
    hint = "" if isinstance(error, UsageError) else " (URESNET_DEBUG=1 shows the traceback)"
    print(f"uresnet {args.command}: error: {text}{hint}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
