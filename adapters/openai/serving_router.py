"""What routers ask of a replica besides /health: SGLang's worker endpoints, as the SGLang Model
Gateway (`sglang-router`) and vllm-router read them.

- GET /server_info (and its older name /get_server_info): the served model's name (the router
  files the replica under it; without one, clients naming the model get 404 through the router),
  the model's path, parallel sizes and the engine's limits;
- GET /model_info (/get_model_info): what the checkpoint is (generation model, architectures);
- GET /get_load: one entry per data-parallel rank (always one here), SGLang's fields: requests
  running and waiting and `num_tokens`, the KV token slots in use, which the router balances on;
- POST /flush_cache: empties the prefix cache between two engine steps; requests in flight keep
  their blocks (EngineClient.flush_prefix_cache). The router fans it out to every replica.

Each field is named as SGLang names it, next to Pagoda's (vLLM's) own name where they differ, so
both readers find theirs. With an API key, all four need it, as /metrics does: they tell the
model's location and the server's load, and a flush costs every later request its cache hits.
Routers send the key they were given for the worker (sglang-router: `--api-key`).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from pagoda.adapters.common.version import pagoda_version
from pagoda.adapters.openai.errors import SERVER_ERROR, OpenAIError
from pagoda.adapters.openai.state import ServerState
from pagoda.backend.errors import RequestFailed


class RouterEndpoints:
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def routes(self) -> list[Route]:
        return [
            Route("/server_info", self.server_info, methods=["GET"]),
            Route("/get_server_info", self.server_info, methods=["GET"]),
            Route("/model_info", self.model_info, methods=["GET"]),
            Route("/get_model_info", self.model_info, methods=["GET"]),
            Route("/get_load", self.load, methods=["GET"]),
            Route("/flush_cache", self.flush_cache, methods=["POST"]),
        ]

    def _model_path(self) -> str:
        """As configured (a hub id or a folder); the demo model's folder when none was."""
        client = self.state.client
        return client.info.model or client.setup.model_path

    async def server_info(self, request: Request) -> JSONResponse:
        setup = self.state.client.setup
        settings = self.state.settings
        max_model_len = self.state.max_model_len
        return JSONResponse({
            "served_model_name": settings.model_name,
            "served_model_names": settings.served_model_names,
            "model_path": self._model_path(),
            "tokenizer_path": setup.tokenizer_path,
            "version": pagoda_version(),
            "tensor_parallel_size": setup.tensor_parallel_size,
            "tp_size": setup.tensor_parallel_size,
            "data_parallel_size": setup.data_parallel_size,
            "dp_size": setup.data_parallel_size,
            "max_model_len": max_model_len,
            "context_length": max_model_len,
            "max_num_seqs": setup.max_num_seqs,
            "max_running_requests": setup.max_num_seqs,
            "max_num_batched_tokens": setup.max_num_batched_tokens,
            "max_prefill_tokens": setup.max_num_batched_tokens,
            "block_size": setup.block_size,
            "num_kv_blocks": setup.num_kv_blocks,
            "max_total_num_tokens": setup.num_kv_blocks * setup.block_size,
            "enable_prefix_caching": setup.enable_prefix_caching,
            "dtype": setup.dtype,
            "device": setup.device,
            "max_waiting_requests": settings.max_waiting_requests,
        })

    async def model_info(self, request: Request) -> JSONResponse:
        client = self.state.client
        setup = client.setup
        return JSONResponse({
            "model_path": self._model_path(),
            "tokenizer_path": setup.tokenizer_path,
            "served_model_name": self.state.settings.model_name,
            # A text generation model (it also pools hidden states for /v1/embeddings).
            "is_generation": True,
            "model_type": setup.model_type,
            "architectures": list(setup.architectures),
            "max_context_length": self.state.max_model_len,
            "vocab_size": client.info.vocab_size,
            "eos_token_ids": sorted(client.info.eos_token_ids),
        })

    async def load(self, request: Request) -> JSONResponse:
        """As of the engine's last step; a list, one entry per data-parallel rank."""
        snapshot = self.state.client.snapshot
        used, total = snapshot.num_kv_blocks_used, snapshot.num_kv_blocks_total
        return JSONResponse([{
            "dp_rank": 0,
            "num_reqs": snapshot.num_running + snapshot.num_waiting,
            "num_running_reqs": snapshot.num_running,
            "num_waiting_reqs": snapshot.num_waiting,
            # KV token slots of the blocks live requests hold (whole blocks; shared ones once).
            "num_tokens": used * self.state.client.setup.block_size,
            "num_kv_blocks_used": used,
            "num_kv_blocks_total": total,
            "kv_cache_usage": used / max(total, 1),
            "num_cached_blocks": snapshot.num_cached_blocks,
        }])

    async def flush_cache(self, request: Request) -> JSONResponse:
        try:
            flushed = await self.state.client.flush_prefix_cache()
        except RequestFailed as error:
            raise OpenAIError(503, f"the prefix cache was not flushed: {error}",
                              type=SERVER_ERROR, code="engine_not_running") from None
        return JSONResponse({
            "flushed": True,
            "num_dropped_blocks": flushed.num_dropped_blocks,
            "num_kept_blocks": flushed.num_kept_blocks,
        })

