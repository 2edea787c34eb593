"""Output processing: the groups a step touched -> RequestOutputs, as each request asked for them.

A request's `output_kind` decides what its outputs hold: everything so far (CUMULATIVE), only
what is new since its previous output (DELTA: computed here once, so adapters stream what they
receive), or nothing until it finishes (FINAL_ONLY). Beam search hypotheses become completions
with their text here, once the search is done. Request metrics get their timestamps here too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from pagoda.backend.beam_search import Hypothesis
from pagoda.backend.detokenizer import IncrementalDetokenizer
from pagoda.backend.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from pagoda.backend.sampling_params import RequestOutputKind
from pagoda.backend.sequence import Sequence, SequenceGroup


@dataclass(slots=True)
class _Sent:
    """How much of one sequence a DELTA request has been sent."""

    num_tokens: int = 0
    num_chars: int = 0
    finished: bool = False  # its finish_reason was sent: later deltas leave it out


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        # DELTA requests: what each of their sequences has been sent, by request id and seq id.
        self._sent: dict[str, dict[int, _Sent]] = {}

    def outputs(self, groups: list[SequenceGroup]) -> list[RequestOutput]:
        """The outputs due for `groups` (those a step touched, or aborted), in order."""
        now = time.monotonic()
        outputs = []
        for group in groups:
            metrics = group.metrics
            if metrics.first_token_time is None and any(s.num_output_tokens for s in group.seqs):
                metrics.first_token_time = now
            if group.is_finished and metrics.finished_time is None:
                metrics.finished_time = now
            output = self.output(group)
            if output is not None:
                outputs.append(output)
        return outputs

    def output(self, group: SequenceGroup) -> RequestOutput | None:
        """The group's output now; None when it has nothing to report yet (FINAL_ONLY while
        running, and samples beyond n or beams whose winners are known only at the end)."""
        kind = group.params.output_kind
        finished = group.is_finished
        if not finished and (kind is RequestOutputKind.FINAL_ONLY or not _streams_partial(group)):
            return None
        delta = kind is RequestOutputKind.DELTA
        # A DELTA request's prompt logprobs go with its first output only.
        first = group.request_id not in self._sent
        if group.beam_results is not None:
            completions = [self._beam_completion(group, index, hypothesis)
                           for index, hypothesis in enumerate(group.beam_results)]
        else:
            seqs = _reported_seqs(group, finished)
            if delta:
                sent = self._sent.setdefault(group.request_id, {})
                # A sample whose finish was sent has nothing more to say.
                seqs = [seq for seq in seqs
                        if seq.seq_id not in sent or not sent[seq.seq_id].finished]
            completions = [self._completion(group, seq, delta) for seq in seqs]
            if finished and group.params.num_sequences > group.params.n:
                for rank, completion in enumerate(completions):
                    completion.index = rank  # best_of: the winners, renumbered best first
        if finished:
            self._sent.pop(group.request_id, None)
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=group.metrics,
            error=group.error,
            delta=delta,
            prompt_logprobs=_prompt_logprobs(group) if first or not delta else None,
            embedding=group.pooling.embedding() if group.pooling is not None else None,
        )

    def _completion(self, group: SequenceGroup, seq: Sequence, delta: bool) -> CompletionOutput:
        # NOTE: a delta reads only what is new (text, tokens and logprobs past what was sent), so
        # a step costs each sequence its new tokens, not its whole output so far.
        sent = (self._sent.setdefault(group.request_id, {}).setdefault(seq.seq_id, _Sent())
                if delta else _Sent())
        detokenizer = seq.detokenizer
        text = detokenizer.output_text(seq.is_finished, sent.num_chars) if detokenizer else ""
        token_ids = seq.token_ids[seq.num_prompt_tokens + sent.num_tokens :]
        logprobs = seq.logprobs[sent.num_tokens :] if group.want_logprobs else None
        if delta:
            sent.num_chars += len(text)
            sent.num_tokens += len(token_ids)
            sent.finished = seq.is_finished
        return CompletionOutput(
            index=seq.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=seq.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
        )

    def _beam_completion(
        self, group: SequenceGroup, index: int, hypothesis: Hypothesis
    ) -> CompletionOutput:
        params = group.params
        assert group.beam is not None
        tokens = hypothesis.output_token_ids
        stopped = tokens[-1] in group.beam.stop_token_ids
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, group.prompt_token_ids, skip_special_tokens=params.skip_special_tokens
        )
        shown = tokens if (not stopped or params.include_stop_str_in_output) else tokens[:-1]
        for token_id in shown:
            detokenizer.add_token(token_id)
        return CompletionOutput(
            index=index,
            text=detokenizer.output_text(finished=True),
            token_ids=list(tokens),
            cumulative_logprob=hypothesis.cumulative_logprob,
            logprobs=None,
            finish_reason="stop" if stopped else "length",
            score=hypothesis.score,
        )


def _prompt_logprobs(group: SequenceGroup) -> PromptLogprobs | None:
    return list(group.prompt_logprobs) if group.prompt_logprobs is not None else None


def _streams_partial(group: SequenceGroup) -> bool:
    """Whether a running group's outputs mean anything before it finishes: not for beam search
    (beams change course) nor for best_of > n (the winners are known only at the end)."""
    params = group.params
    return not params.use_beam_search and params.num_sequences == params.n


def _reported_seqs(group: SequenceGroup, finished: bool) -> list[Sequence]:
    """The sequences a finished or running group reports on: with best_of > n, once finished,
    the n with the highest cumulative logprob, best first."""
    params = group.params
    if not finished or params.num_sequences == params.n or group.beam is not None:
        return list(group.seqs)
    ranked = sorted(group.seqs, key=lambda seq: seq.cumulative_logprob, reverse=True)
    return ranked[: params.n]
