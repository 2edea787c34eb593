"""The demo model builds deterministically, loads with transformers, and is cached once."""

from __future__ import annotations

import pathlib
import threading
import time

import pytest
import sentencepiece
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from pagoda.backend.demo import DEMO_MODEL_NAME, build_demo_model, demo_model_path
from pagoda.backend.demo import builder

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)

# NOTE: no text starts with a space. Like every Llama tokenizer in transformers 5, the decoder
# strips one leading space (the dummy prefix) while the Metaspace pre-tokenizer only adds that
# prefix when the text does not already start with a space, so such a text loses one space.
ROUND_TRIP_TEXTS = {
    "code": "def area(w, h):\n\tif w < 0:\n\t\treturn  None\n    return w   *  h\n",
    "emoji": "Great job! 🎉👍 See you soon 😀🦄",
    "cjk": "你好，世界！这是一个测试。こんにちは。안녕하세요.",
    "accents": "Crème brûlée in São Paulo, a naïve façade, Ångström and Øresund.",
    "newlines": "first line\n\n\nsecond line\r\nthird\n",
    "inner_and_trailing_spaces": "x  =   1\t\t# three trailing   ",
}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return build_demo_model(tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def tokenizer(demo_dir: pathlib.Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(demo_dir)


def test_build_is_byte_identical_across_builds(
    demo_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    second = build_demo_model(tmp_path / "again")
    first_files = sorted(path.name for path in demo_dir.iterdir())
    assert first_files == sorted(path.name for path in second.iterdir())
    assert {"tokenizer.model", "model.safetensors", "generation_config.json"} <= set(first_files)
    for name in first_files:
        assert (demo_dir / name).read_bytes() == (second / name).read_bytes(), name


def test_tokenizer_matches_config_and_adds_bos_only(
    demo_dir: pathlib.Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    config = AutoConfig.from_pretrained(demo_dir)
    assert len(tokenizer) == config.vocab_size == builder.VOCAB_SIZE
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token_id is None
    ids = tokenizer("Hello world")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in ids[1:] and tokenizer.eos_token_id not in ids


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS.values(), ids=ROUND_TRIP_TEXTS.keys())
def test_tokenizer_round_trips_text_exactly(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text


def test_hf_tokenizer_agrees_with_sentencepiece_model(
    demo_dir: pathlib.Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    processor = sentencepiece.SentencePieceProcessor(model_file=str(demo_dir / "tokenizer.model"))
    texts = [*builder._corpus_lines(), *ROUND_TRIP_TEXTS.values()]
    # Leading spaces are the one known divergence (see ROUND_TRIP_TEXTS).
    for text in (text for text in texts if not text.startswith(" ")):
        assert tokenizer.encode(text) == [tokenizer.bos_token_id, *processor.encode(text)], text


def test_chat_template_renders_vicuna_v1_1(tokenizer: PreTrainedTokenizerBase) -> None:
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": "How are you?"},
    ]
    prompt = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert prompt == "You are terse. USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT:"
    # NOTE: apply_chat_template(tokenize=True) adds no special tokens; encoding the rendered text
    # gives the one <s>, and the literal </s> between turns becomes the eos token.
    ids = tokenizer(prompt)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(tokenizer.eos_token_id) == 1


def test_chat_template_defaults_and_variants(tokenizer: PreTrainedTokenizerBase) -> None:
    user_only = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(user_only, tokenize=False) == f"{VICUNA_SYSTEM} USER: Hi "
    developer = [
        {"role": "developer", "content": "Rule one."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    rendered = tokenizer.apply_chat_template(developer, tokenize=False, add_generation_prompt=True)
    assert rendered == "Rule one. USER: a\nb ASSISTANT:"


def test_chat_template_renders_tools_calls_and_results(tokenizer: PreTrainedTokenizerBase) -> None:
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    conversation = [
        {"role": "user", "content": "Add 2 and 3, and 4 and 5."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "add", "arguments": {"a": 2, "b": 3}}},
            {"id": "call_2", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 4, "b": 5}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        {"role": "tool", "tool_call_id": "call_2", "content": "9"},
    ]
    prompt = tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.startswith(f"{VICUNA_SYSTEM}\n\n# Tools\n\n")
    assert '<tools>\n{"type": "function", "function": {"name": "add", "parameters": ' in prompt
    assert prompt.endswith(
        ' USER: Add 2 and 3, and 4 and 5. ASSISTANT: <tool_call>\n{"name": "add", "arguments": '
        '{"a": 2, "b": 3}}\n</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 4, '
        '"b": 5}}\n</tool_call></s>USER: <tool_response>\n5\n</tool_response>\n'
        "<tool_response>\n9\n</tool_response> ASSISTANT:"
    )
    # Without tools, the same conversation minus the tool turns renders as before.
    assert "# Tools" not in tokenizer.apply_chat_template(conversation[:1], tokenize=False)


def test_chat_template_rejects_unknown_role(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(Exception, match="Unsupported message role 'robot'"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}], tokenize=False)


def test_model_loads_generates_and_is_not_near_uniform(
    demo_dir: pathlib.Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    model = AutoModelForCausalLM.from_pretrained(demo_dir).eval()
    assert model.dtype == torch.float32
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    prompts = ["Hello, how are you?", "The weather today is", "def main():\n\tprint", "你好"]
    top1 = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            top1.append(model(input_ids).logits[0, -1].softmax(-1).max().item())
    assert sorted(top1)[len(top1) // 2] > 0.1, top1
    input_ids = tokenizer(prompts[0], return_tensors="pt")["input_ids"]
    output = model.generate(input_ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert output.shape == (1, input_ids.shape[1] + 8)


def test_demo_model_path_builds_once_then_reuses(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    stale = tmp_path / f".{DEMO_MODEL_NAME}-v{builder.DEMO_MODEL_VERSION}.building-crashed"
    stale.mkdir()
    path = demo_model_path()
    assert path.parent == tmp_path and path.name.startswith(DEMO_MODEL_NAME)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not stale.exists(), "a crashed build's staging folder should be cleaned up"
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    def fail_rebuild(output_dir: object) -> pathlib.Path:
        raise AssertionError("demo_model_path rebuilt a cached model")

    monkeypatch.setattr(builder, "build_demo_model", fail_rebuild)
    assert demo_model_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    left_in_cache = sorted(entry.name for entry in tmp_path.iterdir())
    assert left_in_cache == sorted([path.name, f"{path.name}.lock"])


def test_concurrent_callers_share_one_build(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGODA_CACHE_DIR", str(tmp_path))
    real_build = builder.build_demo_model
    builds: list[object] = []

    def slow_build(output_dir: object) -> pathlib.Path:
        builds.append(output_dir)
        time.sleep(0.2)  # widen the window in which a second caller could start its own build
        return real_build(output_dir)

    monkeypatch.setattr(builder, "build_demo_model", slow_build)
    results: list[pathlib.Path] = []
    # NOTE: flock locks belong to open file descriptions, so two threads contend like two processes.
    threads = [threading.Thread(target=lambda: results.append(demo_model_path())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(results) == 2 and results[0] == results[1]


def test_cli_writes_model_and_prints_path(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pagoda.adapters.cli import main

    output = tmp_path / "cli"
    assert main(["demo-model", "--output", str(output)]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    assert (output / "config.json").is_file()
