"""Appends a sampled token to its sequence and applies the stop conditions.

The scheduler calls it while it applies a step's output, so a sequence that stops (EOS, a stop
token or string, max_tokens, max_model_len) frees its KV blocks in the same update. Stop strings
are matched here too, on the sequence's incremental detokenizer, rather than later in output
processing: a stopped sequence must not be scheduled again. A structured-output sequence's
grammar matcher advances here too, and a terminated grammar ends the sequence with "stop".
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pagoda.backend.model_output import SampledToken
from pagoda.backend.sequence import Sequence, SequenceGroup

logger = logging.getLogger(__name__)


class StopChecker:
    def __init__(self, eos_token_ids: Iterable[int], max_model_len: int) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len

    def append_token(self, group: SequenceGroup, seq: Sequence, token: SampledToken) -> None:
        token_id = token.token_id
        seq.token_ids.append(token_id)
        seq.cumulative_logprob += token.logprob
        if group.want_logprobs:
            seq.logprobs.append(token.as_logprobs())
        if seq.grammar is not None and not self._advance_grammar(group, seq, token_id):
            return
        self._check_stop(group, seq, token_id)
        if seq.grammar is not None and not seq.is_finished and seq.grammar.is_terminated():
            # The grammar's end came with a stop token that is not an EOS (or ignore_eos).
            seq.finish("stop")

    def _advance_grammar(self, group: SequenceGroup, seq: Sequence, token_id: int) -> bool:
        """Advance the sequence's matcher; a token its grammar refuses (the bitmask allowed
        nothing, say with min_tokens banning the only stop token) ends the sequence."""
        assert seq.grammar is not None
        if seq.grammar.accept_token(token_id):
            return True
        logger.warning("request %s: token %d breaks its grammar; the sequence stops",
                       group.request_id, token_id)
        if seq.detokenizer is not None:
            seq.detokenizer.add_token(token_id)
        seq.finish("stop")
        return False

    def _check_stop(self, group: SequenceGroup, seq: Sequence, token_id: int) -> None:
        params = group.params
        detokenizer = seq.detokenizer
        # NOTE: the sampler masks eos and stop tokens until min_tokens are out, so any seen here
        # may end the sequence.
        if token_id in params.stop_token_ids or (
            token_id in self.eos_token_ids and not params.ignore_eos
        ):
            if params.include_stop_str_in_output and detokenizer is not None:
                detokenizer.add_token(token_id)
            stop_reason = None if token_id in self.eos_token_ids else token_id
            seq.finish("stop", stop_reason)
            return
        stop_string = detokenizer.add_token(token_id) if detokenizer is not None else None
        if stop_string is not None:
            seq.finish("stop", stop_string)
        elif (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) or len(
            seq.token_ids
        ) >= self.max_model_len:
            seq.finish("length")
