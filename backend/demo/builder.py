"""Build the demo model: a tiny, deterministic Llama checkpoint made locally, with no download.

The checkpoint is a sentencepiece BPE tokenizer trained on the bundled ``corpus.txt`` plus a
randomly initialised 4-layer ``LlamaForCausalLM``. It speaks no language, but it has every part a
real Vicuna-style checkpoint has (tokenizer.model, tokenizer.json, chat template, config.json,
generation_config.json, model.safetensors), so the engine, the adapters and the tests can run on
a fresh machine. The same code and package data always give the same bytes.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.resources
import io
import logging
import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Iterator

import sentencepiece
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer
from transformers.tokenization_utils_base import generate_merges
from transformers.utils import logging as hf_logging

from pagoda.backend.demo import DEMO_MODEL_NAME

logger = logging.getLogger(__name__)

# NOTE: bump whenever the recipe (corpus, tokenizer or model settings) changes, so cached
# copies built by an older recipe are not reused.
DEMO_MODEL_VERSION = 2

CACHE_DIR_ENV = "PAGODA_CACHE_DIR"
DEFAULT_CACHE_DIR = pathlib.Path("~/.cache/pagoda")

VOCAB_SIZE = 4096
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
MAX_POSITIONS = 4096
SEED = 0
# The final RMSNorm gives the hidden state a norm of about sqrt(hidden_size) ~= 11.3, so the
# logits have a standard deviation of about 11.3 * initializer_range. A 4096-way softmax only puts
# more than 0.1 on its top token when that spread is ~3-4: at 0.08 the top-1 probability is ~0.005
# (near-uniform, greedy ties, repetition loops); at 0.3 it is above 0.1 at ~80% of positions and the
# next token depends strongly on the context, so KV-cache mistakes change the output. Hidden states
# stay within a few hundred, safe in float16.
INITIALIZER_RANGE = 0.3

_PACKAGE = "pagoda.backend.demo"


def build_demo_model(output_dir: str | os.PathLike[str]) -> pathlib.Path:
    """Write the demo checkpoint into ``output_dir`` (created if missing) and return its path.

    Deterministic: every call gives byte-identical ``tokenizer.model`` and ``model.safetensors``.
    Files already in the folder with the same names are overwritten; other files are left alone.
    """
    folder = pathlib.Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    spm_model = _train_sentencepiece()
    (folder / "tokenizer.model").write_bytes(spm_model)
    tokenizer = _hf_tokenizer(spm_model)
    tokenizer.save_pretrained(folder)
    model = _random_model(_llama_config(len(tokenizer)))
    with _no_progress_bars():
        model.save_pretrained(folder, safe_serialization=True)
    # safetensors writes its file with mode 0600; a checkpoint built as one user (say, in a
    # container image) must stay readable by the user who serves it, like its other files.
    (folder / "model.safetensors").chmod(0o644)
    logger.info("built %s in %s (%.1f s)", DEMO_MODEL_NAME, folder, time.perf_counter() - started)
    return folder


def demo_model_path() -> pathlib.Path:
    """Return the cached demo model folder, building it first if it is missing.

    The cache root is ``$PAGODA_CACHE_DIR`` (default ``~/.cache/pagoda``). The folder only ever
    appears complete: it is built in a temporary sibling and renamed into place, and a file lock
    makes concurrent callers wait for one build instead of racing.
    """
    cache_root = pathlib.Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()
    target = cache_root / f"{DEMO_MODEL_NAME}-v{DEMO_MODEL_VERSION}"
    if target.is_dir():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_root / f"{target.name}.lock"):
        # NOTE: re-check under the lock: another process may have built it while we waited.
        if not target.is_dir():
            _build_into_place(target)
    return target


def _corpus_lines() -> list[str]:
    corpus = importlib.resources.files(_PACKAGE).joinpath("corpus.txt")
    return corpus.read_text(encoding="utf-8").splitlines()


def _train_sentencepiece() -> bytes:
    """Train the BPE tokenizer on the bundled corpus and return the serialized model."""
    # Training on every sentence in order (no sampling, no shuffling) should draw no random
    # numbers; the seed pins the library's generator anyway so determinism never hangs on that.
    sentencepiece.set_random_generator_seed(SEED)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        # Identity normalization and kept whitespace: tabs, runs of spaces and any Unicode text
        # round-trip, and the Hugging Face tokenizer (which has no normalizer) tokenizes alike.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        byte_fallback=True,
        split_digits=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=-1,
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def _hf_tokenizer(spm_model: bytes) -> LlamaTokenizer:
    """Build the Hugging Face tokenizer equivalent to ``spm_model``, with the chat template set.

    NOTE: ``LlamaTokenizer.from_pretrained`` on a folder holding only tokenizer.model needs the
    protobuf package to read it (without it transformers falls back to tiktoken and fails), so the
    vocab and merges are taken from the sentencepiece processor instead; transformers' own
    ``generate_merges`` orders the merges exactly as its sentencepiece conversion does.
    """
    processor = sentencepiece.SentencePieceProcessor(model_proto=spm_model)
    vocab = {processor.id_to_piece(index): index for index in range(processor.get_piece_size())}
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        unk_token=processor.id_to_piece(UNK_ID),
        bos_token=processor.id_to_piece(BOS_ID),
        eos_token=processor.id_to_piece(EOS_ID),
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=MAX_POSITIONS,
    )
    template = importlib.resources.files(_PACKAGE).joinpath("chat_template.jinja")
    tokenizer.chat_template = template.read_text(encoding="utf-8")
    return tokenizer


def _llama_config(vocab_size: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )


def _random_model(config: LlamaConfig) -> LlamaForCausalLM:
    """Instantiate the model in float32, weights fixed by ``SEED``; the global RNG is left as is."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    return model


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Without transformers' progress bars: the one save_pretrained draws for its single shard
    ("Writing model shards") reads as a download to someone starting `pagoda serve` first."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _exclusive_lock(lock_path: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path``; the OS drops it if the process dies."""
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _build_into_place(target: pathlib.Path) -> None:
    """Build in a temporary sibling of ``target``, then rename it into place. Needs the lock."""
    staging_prefix = f".{target.name}.building-"
    # NOTE: under the lock no other builder is alive, so any staging folder left is from a crash.
    for stale in target.parent.glob(f"{staging_prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=staging_prefix, dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it 0700; the finished folder should read like any other
    logger.info("building %s into the cache at %s", DEMO_MODEL_NAME, target)
    try:
        build_demo_model(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

