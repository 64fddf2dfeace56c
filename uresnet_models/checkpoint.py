"""A training run's checkpoints. An output folder holds ``best/`` and ``last/``:
``model.safetensors`` + ``config.json`` (+ the README.md model card) from ``save_pretrained``,
``training.json`` with the data description, the config and the metrics, and in ``last/``
``state.pt`` (optimizer, scheduler, scaler, history) for ``--resume``."""
from __future__ import annotations

import json
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .data import DataInfo

if TYPE_CHECKING:
    from .train import TrainConfig

TRAINING_JSON = "training.json"
STATE_NAME = "state.pt"
RUN_CONTENTS = ("best", "last", "log.csv", "log.json", "curves.png", "samples.png")  # what a run writes in --out


def run_contents(out) -> list[str]:
    """The names of a training run's files and folders in ``out`` (none: it holds no run)."""
    return [name for name in RUN_CONTENTS if (Path(out) / name).exists()]


def clear_run(out) -> None:
    """Remove a run's files and folders from ``out``; anything else there stays."""
    for name in run_contents(out):
        path = Path(out) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def save_checkpoint(folder: Path, model: nn.Module, info: DataInfo, cfg: TrainConfig, epoch: int, metrics: dict,
                    state: dict | None = None) -> Path:
    """``save_pretrained`` (its README.md card with the data and the metrics) + ``training.json``
    (+ ``state.pt`` for resuming)."""
    classes = ", ".join(map(str, info.class_names))
    training = {"trained on": f"{info.format} `{cfg.data}` ({info.task}; classes: {classes})",
                "epoch": epoch, "recipe": f"{cfg.optimizer} lr {cfg.lr}, batch {cfg.batch_size}, image size "
                f"{cfg.image_size}, loss {cfg.loss}" + (", encoder frozen" if cfg.freeze_encoder else "")}
    model.save_pretrained(folder, metrics=metrics, model_card_kwargs={"training": training})
    meta = {"epoch": epoch, "metrics": metrics, "data": info.to_dict(), "config": asdict(cfg)}
    (folder / TRAINING_JSON).write_text(json.dumps(meta, indent=1, default=str) + "\n")
    if state is not None:
        torch.save(state, folder / STATE_NAME)
    return folder


def load_checkpoint(path, device=None) -> tuple[nn.Module, DataInfo, dict]:
    """The model, DataInfo and training.json of a checkpoint folder (or of a run folder's best/)."""
    from .hub import from_pretrained, read_json
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not (path / "config.json").is_file() and (path / "best" / "config.json").is_file():
        path = path / "best"
    meta_file = path / TRAINING_JSON
    model = from_pretrained(path, device=device)
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} not found (expected a checkpoint written by uresnet train)")
    meta = read_json(meta_file)
    try:
        info = DataInfo(**{k: tuple(v) if k in ("mean", "std") else v for k, v in meta["data"].items()})
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{meta_file}: no data description ({type(error).__name__}: {error}); the checkpoint is "
                         "damaged: write it again or restore it") from None
    if model.preprocessing is None:  # written before the model carried it: training normalised with these
        model.preprocessing = {"mean": info.mean, "std": info.std, "input_range": (0, 1)}
    return model.eval(), info, meta


def load_resume(path, model: nn.Module, device) -> tuple[Path, dict]:
    """Load the weights of a run's ``last/`` (``path``: the run or its last/ folder) into
    ``model``, which must be the same architecture with the same arguments; returns the folder
    and its ``state.pt`` (what :func:`save_checkpoint` was given as ``state``)."""
    from .hub import CONFIG_NAME, WEIGHTS_NAME, load_weights, read_json
    folder = Path(path)
    folder = folder / "last" if (folder / "last").is_dir() else folder
    for name in (CONFIG_NAME, WEIGHTS_NAME, STATE_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"cannot resume: {folder / name} not found (expected the last/ folder of a run)")
    saved = read_json(folder / CONFIG_NAME)
    if {k: saved.get(k) for k in ("architecture", "kwargs")} != getattr(model, "model_config", None):
        raise ValueError(f"cannot resume from {folder}: it holds {saved.get('architecture')} with "
                         f"{saved.get('kwargs')}, not the model asked for")
    load_weights(model, folder / WEIGHTS_NAME, device=device)
    try:
        state = torch.load(folder / STATE_NAME, map_location=device, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise ValueError(f"{folder / STATE_NAME} is damaged ({str(error).splitlines()[0]}): resume from another copy "
                         "or start again with --overwrite") from None
    return folder, state


def save_interrupted(out: Path, model: nn.Module, info: DataInfo, cfg: TrainConfig, state: dict, epoch: int,
                     say: Callable = print) -> None:
    """Ctrl-C in ``epoch``: write last/ with the weights so far and ``state``, which marks them as
    the end of the epoch before, so that ``--resume`` repeats ``epoch`` from its start with them."""
    history = state["history"]
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "last", model, info, cfg, epoch - 1, history[-1] if history else {}, state)
    say(f"\ninterrupted in epoch {epoch}: saved the weights so far and the optimizer state to {out / 'last'}; "
        f"continue with the same command and --resume (epoch {epoch} is repeated from its start)")
