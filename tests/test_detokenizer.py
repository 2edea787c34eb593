"""IncrementalDetokenizer against tokenizer.decode, on a sentencepiece BPE tokenizer trained here.

The reference for a generated sequence is `decode(prompt + output)[len(decode(prompt)):]` (with
`clean_up_tokenization_spaces=False`): the text the output adds to the prompt's text.
"""

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import generate_merges
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from pagoda.backend.detokenizer import IncrementalDetokenizer

Encode = Callable[[str], list[int]]

VOCAB_SIZE = 500
BOS_ID = 1
PROMPT = "Once upon a time the quick brown fox"
EMOJI = "😀🎉"
CJK = "日本語の中文"
# Continuations of PROMPT. encode() gives each a leading "▁", so each comes back after a space.
TEXTS = [
    "jumps over the lazy dog.",
    f"sees {EMOJI} and {CJK} then naïve café résumé",
    f"{CJK}{EMOJI}",
    "\tcode:\n    indented  two  spaces\n\n",
]


class SlowSentencePieceTokenizer(SentencePieceBackend):
    """A pure-Python ("slow") tokenizer over the same sentencepiece model.

    transformers 5 has no slow Llama tokenizer, and SentencePieceBackend's own
    convert_tokens_to_string neither turns byte-fallback pieces into bytes nor keeps edge spaces;
    so runs of pieces are decoded by sentencepiece itself, as transformers 4's LlamaTokenizer did.
    """

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        parts: list[str] = []
        pieces: list[str] = []
        for token in tokens:
            if token in self.all_special_tokens:
                parts += [self.sp_model.decode_pieces(pieces), token]
                pieces = []
            else:
                pieces.append(token)
        parts.append(self.sp_model.decode_pieces(pieces))
        return "".join(parts)


def _corpus() -> list[str]:
    """A few KB of text: frequent English words (multi-character pieces), accented words common
    enough to get pieces of their own, and CJK and emoji spread over so many code points that
    each is rare, so they go through byte fallback."""
    rng = random.Random(0)
    words = (
        "once upon a time the quick brown fox jumps over lazy dog sees and then code indented "
        "two spaces naïve café résumé über hello world stop string token serving engine"
    ).split()
    rare = [chr(c) for c in [*range(0x4E00, 0x4E00 + 400), *range(0x1F600, 0x1F650)]]
    lines = []
    for _ in range(300):
        line = [rng.choice(words) for _ in range(rng.randint(4, 12))]
        line.insert(rng.randrange(len(line)), "".join(rng.choices(rare, k=rng.randint(1, 3))))
        lines.append(" ".join(line) + rng.choice([".", ",", ":", "\t", "  "]))
    return lines


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(folder / "sp"),
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        remove_extra_whitespaces=False,
        byte_fallback=True,
        # Identity normalization keeps tabs and newlines, as the converted fast tokenizer does.
        normalization_rule_name="identity",
        character_coverage=0.98,
        unk_id=0,
        bos_id=BOS_ID,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "sp.model").rename(folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def llama_tokenizer(sp_folder: Path) -> PreTrainedTokenizerBase:
    # LlamaTokenizer.from_pretrained(sp_folder) reads tokenizer.model with protobuf, which pagoda
    # does not depend on; without it transformers 5 falls back to a tiktoken reader and fails.
    # This builds what from_pretrained builds (same vocab, merges from generate_merges).
    sp_model = spm.SentencePieceProcessor(model_file=str(sp_folder / "tokenizer.model"))
    vocab = {sp_model.id_to_piece(i): i for i in range(sp_model.get_piece_size())}
    tokenizer = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), add_bos_token=True)
    # NOTE: texts that start with a space would differ: sentencepiece always adds its "▁" prefix,
    # the Metaspace pre-tokenizer of transformers 5's LlamaTokenizer only when there is no space.
    for text in [PROMPT, *TEXTS]:
        assert tokenizer.encode(text) == [BOS_ID, *sp_model.encode(text)], text
    return tokenizer


@pytest.fixture(scope="module")
def auto_tokenizer(
    llama_tokenizer: PreTrainedTokenizerBase, tmp_path_factory: pytest.TempPathFactory
) -> PreTrainedTokenizerBase:
    folder = tmp_path_factory.mktemp("auto")
    llama_tokenizer.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.is_fast
    return tokenizer


@pytest.fixture(scope="module")
def slow_tokenizer(sp_folder: Path) -> PreTrainedTokenizerBase:
    tokenizer = SlowSentencePieceTokenizer(
        vocab_file=str(sp_folder / "tokenizer.model"),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    assert not tokenizer.is_fast
    return tokenizer


@pytest.fixture(params=["llama", "auto", "slow"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return request.getfixturevalue(f"{request.param}_tokenizer")


@pytest.fixture(scope="module")
def encode(llama_tokenizer: PreTrainedTokenizerBase) -> Encode:
    """Token ids of a text, without BOS. All three tokenizers share ids; the fast one encodes
    (the slow one's encode is not what this file tests)."""
    return lambda text: llama_tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture(scope="module")
def prompt_ids(encode: Encode) -> list[int]:
    return [BOS_ID, *encode(PROMPT)]


def _reference(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], output_ids: list[int], skip: bool
) -> str:
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)

    return decode(prompt_ids + output_ids)[len(decode(prompt_ids)) :]


def _stream(
    detokenizer: IncrementalDetokenizer, output_ids: list[int]
) -> tuple[list[str], str | None]:
    """Feeds tokens until a stop string matches; returns output_text(False) after each token, and
    the stop string."""
    streamed = []
    for token_id in output_ids:
        stop_str = detokenizer.add_token(token_id)
        streamed.append(detokenizer.output_text(False))
        if stop_str is not None:
            return streamed, stop_str
    return streamed, None


def _assert_grows_to(streamed: list[str], final: str) -> None:
    for value, next_value in zip(streamed, [*streamed[1:], final]):
        assert next_value.startswith(value), (value, next_value)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_grows_to_the_decoded_continuation(
    tokenizer: PreTrainedTokenizerBase, encode: Encode, prompt_ids: list[int], text: str
) -> None:
    output_ids = encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    streamed, stop_str = _stream(detokenizer, output_ids)
    final = detokenizer.output_text(True)
    assert stop_str is None
    _assert_grows_to(streamed, final)
    assert not any("\ufffd" in value for value in streamed)
    assert final == _reference(tokenizer, prompt_ids, output_ids, skip=True)
    # The prompt ends in a complete word: the continuation comes back whole, with the leading
    # space of its "▁", although decode(output_ids) alone drops that space.
    assert final == " " + text
    assert tokenizer.decode(output_ids) == text


def test_empty_prompt_decodes_like_the_output_alone(
    tokenizer: PreTrainedTokenizerBase, encode: Encode
) -> None:
    output_ids = encode(TEXTS[1])
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    _stream(detokenizer, output_ids)
    assert detokenizer.output_text(True) == tokenizer.decode(output_ids) == TEXTS[1]


@pytest.mark.parametrize("text", [EMOJI, CJK])
def test_byte_fallback_characters_are_never_split(
    llama_tokenizer: PreTrainedTokenizerBase, encode: Encode, prompt_ids: list[int], text: str
) -> None:
    output_ids = encode(text)
    tokens = llama_tokenizer.convert_ids_to_tokens(output_ids)
    assert sum(token.startswith("<0x") for token in tokens) >= 2 * len(text), tokens
    detokenizer = IncrementalDetokenizer(llama_tokenizer, prompt_ids)
    streamed, _ = _stream(detokenizer, output_ids)
    assert not any("\ufffd" in value for value in streamed)
    # Each character shows up whole, on the token that completes it.
    assert set(streamed) == {" " + text[:length] for length in range(len(text) + 1)}


def test_finished_releases_an_incomplete_character_as_decode_does(
    tokenizer: PreTrainedTokenizerBase, encode: Encode, prompt_ids: list[int]
) -> None:
    output_ids = encode("日")[:-1]  # "▁" and two of the three bytes
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    _stream(detokenizer, output_ids)
    assert detokenizer.output_text(False) == " "
    final = detokenizer.output_text(True)
    assert final == _reference(tokenizer, prompt_ids, output_ids, skip=True)
    assert final.endswith("\ufffd")


def test_each_step_decodes_a_bounded_window(
    llama_tokenizer: PreTrainedTokenizerBase,
    encode: Encode,
    prompt_ids: list[int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded_lengths = []
    decode = IncrementalDetokenizer._decode

    def spy(self: IncrementalDetokenizer, token_ids: list[int]) -> str:
        decoded_lengths.append(len(token_ids))
        return decode(self, token_ids)

    monkeypatch.setattr(IncrementalDetokenizer, "_decode", spy)
    # A run of continuation bytes with no lead byte is invalid UTF-8 whatever follows: it must
    # stream as U+FFFD rather than be held back in an ever longer window. (It follows a word: the
    # ByteFallback decoder turns a whole run of byte tokens into U+FFFD, valid ones included.)
    invalid_bytes = [llama_tokenizer.convert_tokens_to_ids("<0x80>")] * 40
    tail_ids = encode("the end")
    output_ids = encode(" ".join(TEXTS) * 4 + "the end") + invalid_bytes + tail_ids
    detokenizer = IncrementalDetokenizer(llama_tokenizer, prompt_ids)
    streamed, _ = _stream(detokenizer, output_ids)
    # Prompt window (5) + the previous step's tokens (at most 4 when a character was held) + 1 new.
    assert len(output_ids) > 150 and max(decoded_lengths) <= 10
    assert streamed[-len(tail_ids) - 1].endswith("\ufffd" * (len(invalid_bytes) - 3))
    final = detokenizer.output_text(True)
    assert final == _reference(llama_tokenizer, prompt_ids, output_ids, skip=True)


def test_tokens_that_show_only_with_the_next_one_are_held(
    sp_folder: Path, encode: Encode, prompt_ids: list[int]
) -> None:
    # transformers 5's base SentencePieceBackend strips both ends of the text it decodes, so a "▁"
    # token adds nothing until a word follows it; emitting it early would lose its space.
    tokenizer = SentencePieceBackend(vocab_file=str(sp_folder / "tokenizer.model"))
    text = "jumps  over   the lazy dog"
    output_ids = encode(text)
    assert output_ids.count(encode("  x")[0]) >= 3  # the lone "▁" token
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    streamed, _ = _stream(detokenizer, output_ids)
    final = detokenizer.output_text(True)
    _assert_grows_to(streamed, final)
    assert final == _reference(tokenizer, prompt_ids, output_ids, skip=True) == " " + text


def test_stop_string_spans_tokens(llama_tokenizer: PreTrainedTokenizerBase, encode: Encode) -> None:
    # test_stop_strings is only meaningful if "mps ov" is split across tokens.
    tokens = llama_tokenizer.convert_ids_to_tokens(encode(TEXTS[0]))
    assert not any("mps ov" in token.replace("▁", " ") for token in tokens), tokens


@pytest.mark.parametrize(
    ("stop", "include", "expected_text", "expected_stop"),
    [
        (["fox jum"], False, " jumps over the lazy dog.", None),  # not across the prompt
        (["mps ov"], False, " ju", "mps ov"),
        (["mps ov"], True, " jumps ov", "mps ov"),
        ([" jumps"], False, "", " jumps"),
        ([" jumps"], True, " jumps", " jumps"),
        (["lazy", "over", "the"], False, " jumps ", "over"),
        (["dog.", "azy dog", "y d"], False, " jumps over the laz", "y d"),  # " dog": "y d" first
        (["azy dog", "lazy dog"], False, " jumps over the ", "lazy dog"),  # same end: longest
    ],
)
def test_stop_strings(
    tokenizer: PreTrainedTokenizerBase,
    encode: Encode,
    prompt_ids: list[int],
    stop: list[str],
    include: bool,
    expected_text: str,
    expected_stop: str | None,
) -> None:
    output_ids = encode(TEXTS[0])
    detokenizer = IncrementalDetokenizer(
        tokenizer, prompt_ids, stop=stop, include_stop_str_in_output=include
    )
    streamed, stop_str = _stream(detokenizer, output_ids)
    final = detokenizer.output_text(True)
    assert (final, stop_str) == (expected_text, expected_stop)
    _assert_grows_to(streamed, final)
    if expected_stop is not None:
        with pytest.raises(RuntimeError, match="after stop string"):
            detokenizer.add_token(output_ids[-1])


def test_stop_strings_completed_by_one_token(
    llama_tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int]
) -> None:
    # One piece adds several characters at once; of the stop strings it completes, the one that
    # would have matched first, character by character, wins; at a tie, the longest.
    piece_id = llama_tokenizer.convert_tokens_to_ids("▁jumps")
    cases = [  # (stop strings, the one that wins)
        (["jumps", "ju"], "ju"),
        (["umps", " jumps"], " jumps"),
        (["mps", "umps"], "umps"),
    ]
    for stop, expected_stop in cases:
        detokenizer = IncrementalDetokenizer(llama_tokenizer, prompt_ids, stop=stop)
        assert detokenizer.add_token(piece_id) == expected_stop, stop
        assert detokenizer.output_text(True) == " jumps"[: " jumps".index(expected_stop)]


def test_possible_stop_prefix_is_held_back_until_resolved(
    tokenizer: PreTrainedTokenizerBase, encode: Encode, prompt_ids: list[int]
) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["lazy cat", "dog!"])
    streamed, stop_str = _stream(detokenizer, encode("jumps over the lazy dog"))
    assert stop_str is None
    assert streamed[-2] == " jumps over the "  # "lazy" could still become "lazy cat"
    assert streamed[-1] == " jumps over the lazy "  # "lazy d" cannot, but "dog" could be "dog!"
    assert detokenizer.output_text(True) == " jumps over the lazy dog"
    _assert_grows_to(streamed, " jumps over the lazy dog")


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_in_the_middle(
    tokenizer: PreTrainedTokenizerBase, encode: Encode, prompt_ids: list[int], skip: bool
) -> None:
    # More special tokens in a row than a character's bytes: skipped, they must not end up
    # between "hello" and "▁world" and so lose the latter's space.
    eos_ids = [tokenizer.eos_token_id] * 5
    output_ids = [*encode("hello"), *eos_ids, *encode(f"world {EMOJI}"), *eos_ids]
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    streamed, _ = _stream(detokenizer, output_ids)
    final = detokenizer.output_text(True)
    _assert_grows_to(streamed, final)
    assert final == _reference(tokenizer, prompt_ids, output_ids, skip=skip)
    if skip:
        assert final == f" hello world {EMOJI}"
    else:
        assert final.count("</s>") == 2 * len(eos_ids)


def test_rejects_empty_stop_string(llama_tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(llama_tokenizer, [BOS_ID], stop=["ok", ""])


@pytest.mark.parametrize("seed", range(4))
def test_random_tokens_stream_a_growing_prefix(
    tokenizer: PreTrainedTokenizerBase, seed: int
) -> None:
    rng = random.Random(seed)
    # Byte-fallback ids (3..258) are over-represented: most runs of them are invalid UTF-8.
    output_ids = [
        rng.randrange(3, 259) if rng.random() < 0.4 else rng.randrange(VOCAB_SIZE)
        for _ in range(300)
    ]
    stop = ["é", "\ufffd" * 4, "the quick"] if seed % 2 else []
    detokenizer = IncrementalDetokenizer(
        tokenizer,
        [BOS_ID, *rng.sample(range(VOCAB_SIZE), 8)],
        skip_special_tokens=seed < 2,
        stop=stop,
    )
    streamed, _ = _stream(detokenizer, output_ids)
    final = detokenizer.output_text(True)
    _assert_grows_to(streamed, final)
    assert not any(stop_str in final for stop_str in stop)
