"""StructuredOutputs: the engine's grammar engine, with each spec compiled once.

Compiled grammars are kept in an LRU keyed by the spec (`StructuredOutputsParams.key`), so a
schema that every request of an agent sends is compiled on its first request only. The backend
(and its tokenizer vocabulary, which takes ~1 s to build for a 128k vocabulary) is made on first
use, so servers that never see a structured request never pay for it.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

from pagoda.backend.structured.grammar import CompiledGrammar, GrammarBackend
from pagoda.backend.structured.params import BACKENDS, StructuredOutputsParams

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 512


class StructuredOutputs:
    def __init__(
        self,
        backend: str,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        stop_token_ids: Iterable[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(
                f"structured_outputs_backend must be one of {sorted(BACKENDS)}, got {backend!r}"
            )
        self.backend_name = backend
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = frozenset(stop_token_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self._backend: GrammarBackend | None = None
        self.num_compiled = 0  # cache misses, for tests and logs

    def compile(self, spec: StructuredOutputsParams) -> CompiledGrammar:
        """The spec's grammar, compiled now or found in the cache. Raises InvalidParameter for a
        spec the backend cannot compile. Callable from any thread."""
        key = spec.key
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
            backend = self._get_backend()
        # NOTE: compiled outside the lock, so a long compile on a caller's thread never blocks
        # the engine thread's lookups; two callers with the same new spec may both compile it.
        started = time.perf_counter()
        compiled = backend.compile(spec)
        logger.debug("compiled a %s grammar in %.1f ms", spec.kind,
                     1000 * (time.perf_counter() - started))
        with self._lock:
            self.num_compiled += 1
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _get_backend(self) -> GrammarBackend:
        if self._backend is None:
            module_name, class_name = BACKENDS[self.backend_name].split(":")
            backend_class = getattr(importlib.import_module(module_name), class_name)
            started = time.perf_counter()
            self._backend = backend_class(self._tokenizer, self._vocab_size, self._stop_token_ids)
            logger.info("%s ready for structured outputs in %.1f s", self.backend_name,
                        time.perf_counter() - started)
        return self._backend
