"""Loading what an engine serves: the checkpoint's folder, the model built on its device and
filled with its weights, and the tokens that end a generation."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from pagoda.backend.attention import AttentionBackend
from pagoda.backend.config import EngineConfig
from pagoda.backend.demo import demo_model_path
from pagoda.backend.models import CausalLM, ModelContext, build_model
from pagoda.backend.models.layers import LoadsOwnTensors
from pagoda.backend.models.loader import iterate_weights, resolve_model_path, weight_files
from pagoda.backend.quantization.base import QuantizationConfig

logger = logging.getLogger(__name__)


def resolve_engine_model(config: EngineConfig) -> Path:
    """The local folder of the configured model (the demo model's when none is)."""
    if config.model is None:
        return demo_model_path()
    return resolve_model_path(config.model, config.revision, config.allow_pickle_weights)


def load_model(
    model_path: Path,
    hf_config: PretrainedConfig,
    attention: AttentionBackend,
    dtype: torch.dtype,
    device: torch.device,
    allow_pickle_weights: bool,
    quantization: QuantizationConfig | None = None,
) -> CausalLM:
    started = time.monotonic()
    ctx = ModelContext(hf_config, attention, hf_config.max_position_embeddings)
    if quantization is not None:
        ctx = dataclasses.replace(ctx, linear_method=quantization.linear_method)
    with _default_dtype(dtype), torch.device(device):
        model = build_model(ctx)
    if quantization is not None and quantization.from_checkpoint:
        _check_no_stacked_tensors(model, quantization)
    model.load_weights(iterate_weights(weight_files(model_path, allow_pickle_weights)))
    model.eval()
    logger.info("loaded %s (%s, %s%s) in %.1f s", model_path, dtype, device,
                f", {quantization.scheme}" if quantization else "", time.monotonic() - started)
    return model


def _check_no_stacked_tensors(model: CausalLM, quantization: QuantizationConfig) -> None:
    """Modules that route their own checkpoint tensors (mixture-of-experts stacks) read dense
    weights only: refuse before reading a quantized checkpoint's tensors."""
    for path, module in model.named_modules():
        if isinstance(module, LoadsOwnTensors):
            raise ValueError(
                f"{quantization.scheme} checkpoints of this architecture are not supported: its "
                f"{path} ({type(module).__name__}) loads dense weights only; quantized "
                "mixture-of-experts layers are not supported yet"
            )


def eos_token_ids(model_path: Path, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The generation config's eos ids (Llama 3 lists several) and the tokenizer's."""
    eos: set[int] = set()
    with contextlib.suppress(OSError):
        configured = GenerationConfig.from_pretrained(model_path).eos_token_id
        if configured is not None:
            eos.update(configured if isinstance(configured, list) else [configured])
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return eos


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
