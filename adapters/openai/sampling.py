"""OpenAI/vLLM request fields -> SamplingParams, with a 400 naming the field for any bad value."""

from __future__ import annotations

from pagoda.adapters.openai.errors import engine_error, invalid_param
from pagoda.adapters.openai.protocol import SamplingRequest
from pagoda.adapters.openai.structured import structured_outputs_of
from pagoda.backend.errors import InvalidParameter
from pagoda.backend.generation_defaults import NO_SAMPLING_DEFAULTS, SamplingDefaults
from pagoda.backend.sampling_params import RequestOutputKind, SamplingParams
from pagoda.backend.structured import StructuredOutputsParams

# Request fields that SamplingParams takes under the same name.
_PASSED_THROUGH = (
    "n", "best_of", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens",
    "spaces_between_special_tokens", "use_beam_search", "length_penalty", "early_stopping",
)


def build_sampling_params(
    request: SamplingRequest,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    param_names: dict[str, str],
    prompt_logprobs: int | None = None,
    echo: bool = False,
    forced_tool_call: StructuredOutputsParams | None = None,
    skip_special_tokens: bool | None = None,
    defaults: SamplingDefaults = NO_SAMPLING_DEFAULTS,
) -> SamplingParams:
    """max_tokens, logprobs and prompt_logprobs come resolved (their request fields differ
    between endpoints); `param_names` maps a SamplingParams field to the request field an error
    should name, and gets the field that constrains the output (see structured.py). A tool
    parser that reads special tokens overrides skip_special_tokens. max_tokens=0 (the prompt
    alone) is for an `echo` only. `defaults` (the model's generation_config.json) fill the
    sampling fields the request leaves unset and cap max_tokens, as vLLM's do."""
    if max_tokens == 0 and not echo:
        name = param_names.get("max_tokens", "max_tokens")
        raise invalid_param(f"{name} must be >= 1 (0, the prompt alone, needs echo)", name)
    values = {name: getattr(request, name) for name in _PASSED_THROUGH}
    values["structured_outputs"], param_names["structured_outputs"] = structured_outputs_of(
        request, forced_tool_call
    )
    if skip_special_tokens is not None:
        values["skip_special_tokens"] = skip_special_tokens
    if request.use_beam_search and request.temperature is None:
        # Beam search ranks by log-probability; OpenAI's default temperature of 1 is for sampling.
        values["temperature"] = 0.0
    values = defaults.fill(values)
    values["logit_bias"] = _logit_bias(request.logit_bias)
    values["max_tokens"] = defaults.cap_max_tokens(max_tokens)
    values["logprobs"] = logprobs
    values["prompt_logprobs"] = prompt_logprobs
    # A stream sends what each step adds; a whole answer needs only the final output.
    values["output_kind"] = (
        RequestOutputKind.DELTA if request.stream else RequestOutputKind.FINAL_ONLY
    )
    # null means the default: leave those out (max_tokens None is meaningful: no limit).
    kwargs = {k: v for k, v in values.items() if v is not None or k == "max_tokens"}
    try:
        return SamplingParams(**kwargs)
    except InvalidParameter as error:
        raise engine_error(error, param_names) from None


def check_streamable(request: SamplingRequest, params: SamplingParams) -> None:
    """Samples beyond n are dropped only when all are done, so their text cannot be streamed;
    vLLM's prompt_logprobs field is a whole answer's."""
    if request.stream and params.num_sequences > params.n and not params.use_beam_search:
        raise invalid_param("best_of greater than n is not supported with stream", "best_of")
    if request.stream and request.prompt_logprobs is not None:
        raise invalid_param("prompt_logprobs is not supported with stream", "prompt_logprobs")


def checked_logprobs(value: int | None, name: str, maximum: int) -> int | None:
    """A count of top logprobs, refused with a 400 naming `name` outside 0..maximum."""
    if value is not None and not 0 <= value <= maximum:
        raise invalid_param(f"{name} must be in 0..{maximum}, got {value}", name)
    return value


def _logit_bias(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    if logit_bias is None:
        return None
    try:
        return {int(token_id): bias for token_id, bias in logit_bias.items()}
    except ValueError:
        raise invalid_param("logit_bias keys must be token ids", "logit_bias") from None
