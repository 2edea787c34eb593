"""Finding and reading a Hugging Face checkpoint: a local folder or a hub id, safetensors
weights (single file or sharded with an index), optionally pickle .bin files when allowed."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def resolve_model_path(model: str, revision: str | None, allow_pickle_weights: bool) -> Path:
    """A local folder as is; otherwise download the hub repository's config, tokenizer and
    weights (safetensors, plus .bin only when pickle weights are allowed). Raises ValueError
    when the hub cannot provide it. (EngineConfig has refused missing local folders already.)"""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    if allow_pickle_weights:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(model, revision=revision, allow_patterns=patterns))
    except Exception as error:  # the hub client raises many types; all mean "cannot get it"
        # Its messages run over several lines; the first says what failed.
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(
            f"model {model!r} is not a local folder and the Hugging Face hub did not provide it "
            f"({reason}): check the id, the network and HF_TOKEN (gated models), or pass a "
            "local folder"
        ) from None


def weight_files(folder: Path, allow_pickle_weights: bool) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        return _indexed_files(index)
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return loose
    pickled = _pickle_files(folder)
    if pickled and not allow_pickle_weights:
        raise ValueError(
            f"{folder} has only pickle (.bin) weights, which can run arbitrary code when loaded; "
            "convert them to safetensors or pass allow_pickle_weights=True (--allow-pickle-weights)"
        )
    if pickled:
        return pickled
    raise ValueError(f"no model weights (*.safetensors) found in {folder}")


def _pickle_files(folder: Path) -> list[Path]:
    index = folder / PICKLE_INDEX
    if index.exists():
        return _indexed_files(index)
    return sorted(folder.glob("pytorch_model*.bin"))


def _indexed_files(index: Path) -> list[Path]:
    weight_map = json.loads(index.read_text())["weight_map"]
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def iterate_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every file, read lazily one at a time."""
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as reader:
                for name in reader.keys():
                    yield name, reader.get_tensor(name)
        else:
            logger.warning("loading pickle weights from %s (explicitly allowed)", file)
            yield from torch.load(file, map_location="cpu", weights_only=True).items()


def checkpoint_dtype(config) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None
