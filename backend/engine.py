"""LLMEngine: requests in, one scheduled model step at a time, RequestOutputs out."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from pagoda.backend.attention import AttentionBackend, get_attention_backend
from pagoda.backend.beam_search import BeamSearchState
from pagoda.backend.chat_formats import fallback_chat_template
from pagoda.backend.config import EngineConfig
from pagoda.backend.cuda_graphs import DecodeGraphRunner, cuda_graph_sizes
from pagoda.backend.detokenizer import IncrementalDetokenizer
from pagoda.backend.errors import InvalidParameter, PromptTooLong, RequestFailed
from pagoda.backend.generation_defaults import load_sampling_defaults
from pagoda.backend.host import apply_cpu_threads
from pagoda.backend.kv.block_manager import BlockManager, KVStats, PrefixCacheFlush
from pagoda.backend.kv.cache_tensors import allocate_kv_cache, bytes_per_block, choose_num_blocks
from pagoda.backend.long_context import long_context_of
from pagoda.backend.memory_profile import kv_cache_budget, profile_memory
from pagoda.backend.model_input import build_model_input
from pagoda.backend.model_output import ModelOutput
from pagoda.backend.model_runner import ModelRunner
from pagoda.backend.model_loading import eos_token_ids, load_model, resolve_engine_model
from pagoda.backend.models import KVCache
from pagoda.backend.models.loader import checkpoint_dtype
from pagoda.backend.output_processor import OutputProcessor
from pagoda.backend.outputs import RequestMetrics, RequestOutput
from pagoda.backend.prompt import encode_prompt
from pagoda.backend.quantization.detect import resolve_quantization
from pagoda.backend.pooling import PoolingState
from pagoda.backend.pooling_params import PoolingParams, PoolingType
from pagoda.backend.sampler import Sampler
from pagoda.backend.sampling_params import RequestOutputKind, SamplingParams
from pagoda.backend.scheduler import Scheduler, SchedulerOutput
from pagoda.backend.sequence import Sequence, SequenceGroup, sample_seed
from pagoda.backend.structured import CompiledGrammar, StructuredOutputs

logger = logging.getLogger(__name__)

# Left out of the KV cache on CUDA for what the profiling step does not allocate: the CUDA graph
# pool and the decode kernel's split-K partial results (~0.3 GiB at 256 sequences of 32k tokens
# for Llama-3-8B; ~1.1 GiB at 128k).
CUDA_RESERVE_BYTES = 1024**3

Prompt = str | list[int]


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = config.torch_device
        apply_cpu_threads(config.cpu_threads)
        model_path = resolve_engine_model(config)
        self.model_path = model_path  # the local folder the weights were loaded from
        hf_config = AutoConfig.from_pretrained(model_path, trust_remote_code=config.trust_remote_code)
        quantization = resolve_quantization(hf_config, config.quantization)
        self.hf_config = hf_config
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            config.tokenizer or model_path, trust_remote_code=config.trust_remote_code
        )
        self.dtype = config.resolve_dtype(checkpoint_dtype(hf_config), quantization is not None)
        attention = get_attention_backend(self.device)
        self.model = load_model(model_path, hf_config, attention, self.dtype, self.device,
                                config.allow_pickle_weights, quantization)

        num_layers, num_kv_heads, head_dim = self.model.kv_shape
        block_bytes = bytes_per_block(
            num_layers, config.block_size, num_kv_heads, head_dim, self.dtype
        )
        num_blocks = choose_num_blocks(
            config, block_bytes, self.device, hf_config.max_position_embeddings,
            self._profiled_kv_budget(),
        )
        self.max_model_len = config.resolve_max_model_len(
            hf_config.max_position_embeddings, num_blocks * config.block_size
        )
        kv_caches = allocate_kv_cache(
            num_layers, num_blocks, config.block_size, num_kv_heads, head_dim, self.dtype,
            self.device,
        )
        self.long_context = long_context_of(self.model, self.max_model_len)
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching, self.long_context)
        self.eos_token_ids = eos_token_ids(model_path, self.tokenizer)
        self.sampling_defaults = load_sampling_defaults(config.generation_config, model_path)
        self.scheduler = Scheduler(
            self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
            self.max_model_len, self.eos_token_ids, long_context=self.long_context,
        )
        self.runner = ModelRunner(
            self.model, kv_caches, attention, Sampler(self.eos_token_ids, seed=config.seed),
            self.device, self._graph_runner(kv_caches, attention),
        )
        # For a tokenizer without a chat template: its family's, when known.
        self.fallback_chat_template = None if self.tokenizer.chat_template else (
            fallback_chat_template(getattr(hf_config, "architectures", None) or [],
                                   [config.model or "", self.tokenizer.name_or_path])
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.structured = StructuredOutputs(
            config.structured_outputs_backend, self.tokenizer, hf_config.vocab_size,
            self.eos_token_ids,
        )
        self.requests: dict[str, SequenceGroup] = {}
        # Test hook: called with each scheduled request before every forward; whatever it raises
        # is a failure of the model on that request (see _isolate_failure). None in production,
        # so it costs one attribute check per step.
        self.fault_injector: Callable[[SequenceGroup], None] | None = None

    def _profiled_kv_budget(self) -> int | None:
        """On CUDA, unless the KV cache's size is given: the bytes a profiling step leaves for it
        once the weights, a full step's activations and a reserve for the CUDA graph pool and
        the decode kernel's split-K buffers are counted."""
        config = self.config
        if self.device.type != "cuda" or config.num_kv_blocks or config.kv_cache_memory_bytes:
            return None
        profile = profile_memory(self.model, self.device, config.max_num_batched_tokens,
                                 config.max_num_seqs, config.block_size)
        return kv_cache_budget(profile, config.gpu_memory_utilization, CUDA_RESERVE_BYTES)

    def _graph_runner(
        self, kv_caches: list[KVCache], attention: AttentionBackend
    ) -> DecodeGraphRunner | None:
        """CUDA graphs for decode steps where the device and attention backend allow them (and
        enforce_eager does not forbid them); the same padded buffers run eagerly when only
        static_decode_buffers asks for them."""
        config = self.config
        capture = (self.device.type == "cuda" and attention.supports_cuda_graphs
                   and not config.enforce_eager)
        if not (capture or config.static_decode_buffers):
            return None
        runner = DecodeGraphRunner(
            self.model, kv_caches, attention,
            config.cuda_graph_sizes or cuda_graph_sizes(config.max_num_seqs),
            self.max_model_len, config.block_size, self.device,
        )
        if capture:
            runner.capture()
        return runner

    # -- requests ---------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | PoolingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request: generation (SamplingParams) or an embedding (PoolingParams: the
        prompt's pooled final hidden states, in RequestOutput.embedding of its one, final
        output). Raises a RequestRejected naming the field for a request that can never run
        (empty or over-long prompt, token ids outside the vocabulary, duplicate id, more samples
        than a step runs, more KV blocks than the whole cache, a structured-outputs spec that
        does not compile), before anything of it is queued or allocated."""
        if isinstance(params, PoolingParams):
            # Prefill only, as max_tokens=0 is; the embedding comes with the final output.
            pooling, params = params, SamplingParams(
                max_tokens=0, output_kind=RequestOutputKind.FINAL_ONLY
            )
        else:
            pooling, params = None, params or SamplingParams()
        if request_id in self.requests:
            raise InvalidParameter("request_id", f"request_id {request_id!r} is already in use")
        limit = min(self.config.max_num_seqs, self.config.max_num_batched_tokens)
        if params.num_sequences > limit:
            # NOTE: checked before the group's sequences are built, however many it asks for.
            raise InvalidParameter(
                "n" if params.best_of is None else "best_of",
                f"n/best_of={params.num_sequences} exceeds what one step can run ({limit}: "
                "max_num_seqs and max_num_batched_tokens)",
            )
        prompt_text, prompt_ids = self._encode(prompt)
        self._check_token_ids(prompt_ids, params)
        # A cache hit when the caller compiled it first (EngineClient.generate does).
        grammar = (
            self.structured.compile(params.structured_outputs)
            if params.structured_outputs is not None else None
        )
        group = SequenceGroup(
            request_id=request_id,
            prompt=prompt_text,
            prompt_token_ids=prompt_ids,
            params=params,
            seqs=[
                self._new_sequence(prompt_ids, params, i, grammar)
                for i in range(params.num_sequences)
            ],
            metrics=RequestMetrics(arrival_time or time.monotonic()),
            want_logprobs=params.logprobs is not None and not params.use_beam_search,
            beam=self._beam_state(params, len(prompt_ids)),
            prompt_logprobs=None if params.prompt_logprobs is None else [None],
        )
        if pooling is not None:
            group.pooling = PoolingState(
                PoolingType(pooling.pooling_type or self.config.pooling), pooling.normalize,
                len(prompt_ids),
            )
        self.scheduler.check_fits(group)
        self.requests[request_id] = group
        self.scheduler.add(group)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """A conversation as prompt text, through the model's (or the given) chat template;
        `tools` (OpenAI tool definitions) are the template's `tools` variable. A tokenizer
        without a template falls back on its family's format (backend/chat_formats.py)."""
        if chat_template is None and not self.tokenizer.chat_template:
            chat_template = self.fallback_chat_template
            if chat_template is None:
                raise InvalidParameter(
                    "chat_template", "this model has no chat template; pass chat_template"
                )
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            tools=tools,
            **(chat_template_kwargs or {}),
        )

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, encode_prompt(self.tokenizer, prompt)
        if not isinstance(prompt, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise InvalidParameter("prompt", "prompt must be a string or a list of token ids")
        return None, list(prompt)

    def _check_token_ids(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidParameter("prompt", "prompt must not be empty")
        vocab_size = self.hf_config.vocab_size
        for field_name, token_ids in (
            ("prompt", prompt_ids),
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", list(params.logit_bias)),
        ):
            bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InvalidParameter(
                    field_name,
                    f"{field_name}: token id {bad} is outside the vocabulary (size {vocab_size})",
                )
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLong(len(prompt_ids), self.max_model_len)

    def _beam_state(self, params: SamplingParams, prompt_len: int) -> BeamSearchState | None:
        if not params.use_beam_search:
            return None
        room = self.max_model_len - prompt_len
        return BeamSearchState(
            width=params.num_sequences,
            length_penalty=params.length_penalty,
            early_stopping=params.early_stopping,
            max_new_tokens=min(params.max_tokens or room, room),
            stop_token_ids=frozenset(
                set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
            ),
        )

    def _new_sequence(
        self, prompt_ids: list[int], params: SamplingParams, index: int,
        grammar: CompiledGrammar | None,
    ) -> Sequence:
        detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            prompt_ids,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )
        return Sequence(
            index=index,
            token_ids=list(prompt_ids),
            num_prompt_tokens=len(prompt_ids),
            seed=sample_seed(params.seed, index),
            detokenizer=detokenizer,
            # Each sample walks the grammar on its own, from the start.
            grammar=grammar.matcher() if grammar is not None else None,
        )

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; None if it is unknown or already done."""
        group = self.requests.pop(request_id, None)
        if group is None:
            return None
        self.scheduler.finish(group)
        group.abort()
        return self._outputs([group])[0]

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- stepping ---------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch. Returns an output for every request that produced a token,
        finished or failed in this step, as its output_kind asks (beam search requests and
        best_of > n: only when finished)."""
        scheduler_output = self.scheduler.schedule()
        try:
            model_output = self._execute(scheduler_output)
        except Exception as error:  # noqa: BLE001  (any model failure: find whose it is)
            return self._isolate_failure(scheduler_output, error)
        return self._outputs(self.scheduler.update_from_output(scheduler_output, model_output))

    def _execute(self, scheduler_output: SchedulerOutput) -> ModelOutput:
        if self.fault_injector is not None:
            for item in scheduler_output.scheduled:
                self.fault_injector(item.group)
        model_input = build_model_input(scheduler_output, self.block_manager, self.device,
                                        self.long_context)
        return self.runner.execute(model_input)

    def _outputs(self, groups: list[SequenceGroup]) -> list[RequestOutput]:
        for group in groups:
            if group.is_finished:
                self.requests.pop(group.request_id, None)
        return self.output_processor.outputs(groups)

    def _isolate_failure(
        self, scheduler_output: SchedulerOutput, error: Exception
    ) -> list[RequestOutput]:
        """A step raised: fail only the request(s) it fails on, and let the others go on.

        The failed step may have written part of the KV cache and used up its block copies, so
        every request in it is recomputed from its tokens (as after a preemption); each then runs
        one step alone, and those that raise alone fail with their error."""
        groups = list({id(item.group): item.group for item in scheduler_output.scheduled}.values())
        logger.exception("a step of %d requests failed; retrying them one by one", len(groups),
                         exc_info=error)
        self.scheduler.requeue(groups)
        touched = self.scheduler.update_from_output(
            SchedulerOutput(failed=scheduler_output.failed), ModelOutput()
        )
        if len(groups) == 1:
            self._fail_in_model(groups[0], error)
            return self._outputs([*touched, groups[0]])
        for group in groups:
            alone = self.scheduler.schedule_alone(group)
            if not alone.scheduled:  # no room beside the others now: it runs when there is
                touched.extend(self.scheduler.update_from_output(alone, ModelOutput()))
                continue
            try:
                model_output = self._execute(alone)
            except Exception as group_error:  # noqa: BLE001
                # Its blocks may have been written by the failed attempt: never reuse them.
                self.scheduler.requeue([group])
                self._fail_in_model(group, group_error)
                touched.append(group)
                continue
            touched.extend(self.scheduler.update_from_output(alone, model_output))
        return self._outputs(touched)

    def _fail_in_model(self, group: SequenceGroup, error: Exception) -> None:
        logger.error("request %s failed inside the model: %r", group.request_id, error)
        self.scheduler.finish(group)
        group.fail(RequestFailed(
            f"the model failed on this request: {type(error).__name__}: {error}"
        ))

    def flush_prefix_cache(self) -> PrefixCacheFlush:
        """Forget every cached prompt block no request holds; requests in flight keep theirs.
        Call it between steps (AsyncEngine.run_between_steps does)."""
        flushed = self.block_manager.flush_prefix_cache()
        logger.info("prefix cache flushed: %d blocks dropped, %d kept (in use)",
                    flushed.num_dropped_blocks, flushed.num_kept_blocks)
        return flushed

    def kv_stats(self) -> KVStats:
        return self.block_manager.stats(self.scheduler.live_sequences())

    def check_no_leaks(self) -> None:
        """Assert nothing is running and every KV block is free (for tests)."""
        assert not self.requests, f"live requests: {sorted(self.requests)}"
        assert not self.scheduler.has_unfinished()
        self.block_manager.check_invariants()
        assert not self.block_manager.block_tables, "block tables left behind"
        assert self.block_manager.pool.num_used_blocks == 0, "KV blocks leaked"
