"""The chat formats of the families whose checkpoints carry no chat template or whose format
FastChat lacks: each Jinja form renders exactly the prompt FastChat's API server builds from its
conversation template; the worker reports them by architecture and name; the engine renders
chat prompts with them when the tokenizer has no template."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from pagoda.adapters.fastchat.conv_template import resolve_conv_template
from pagoda.backend import LLM, SamplingParams
from pagoda.backend.chat_formats import FORMATS, chat_format_for
from pagoda.backend.errors import InvalidParameter

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Why?"}],
    # FastChat renders an empty message as its role alone.
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "Go on"}],
]


def _fastchat_prompt(conv_template: dict, messages: list[dict]) -> str:
    """The prompt FastChat's openai_api_server builds from a worker's template."""
    from fastchat.conversation import Conversation, SeparatorStyle

    fields = {**conv_template, "sep_style": SeparatorStyle(conv_template["sep_style"])}
    conv = Conversation(**fields)
    for message in messages:
        if message["role"] == "system":
            conv.set_system_message(message["content"])
        else:
            role = conv.roles[0] if message["role"] == "user" else conv.roles[1]
            conv.append_message(role, message["content"])
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_jinja_form_renders_fastchats_prompt(demo_model_dir, name):
    pytest.importorskip("fastchat")
    chat_format = FORMATS[name]
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    for messages in CONVERSATIONS:
        rendered = tokenizer.apply_chat_template(
            messages, chat_template=chat_format.jinja(), tokenize=False,
            add_generation_prompt=True,
        )
        assert rendered == _fastchat_prompt(chat_format.conv_template(), messages)


def test_the_formats_fastchat_has_are_fastchats():
    pytest.importorskip("fastchat")
    from fastchat.conversation import conv_templates, get_conv_template

    shared = [name for name in FORMATS if name in conv_templates]
    assert shared == ["dolly_v2", "oasst_pythia", "stablelm"]
    for name in shared:
        theirs = get_conv_template(name)
        ours = FORMATS[name].conv_template()
        assert ours["sep_style"] == int(theirs.sep_style)
        for field in ("system_template", "system_message", "sep", "sep2", "stop_str"):
            assert ours[field] == getattr(theirs, field), (name, field)
        assert ours["roles"] == list(theirs.roles)
        assert ours["stop_token_ids"] == theirs.stop_token_ids


@pytest.mark.parametrize(("architecture", "name", "expected"), [
    ("GPTNeoXForCausalLM", "databricks/dolly-v2-3b", "dolly_v2"),
    ("GPTNeoXForCausalLM", "OpenAssistant/oasst-sft-4-pythia-12b-epoch-3.5", "oasst_pythia"),
    ("GPTNeoXForCausalLM", "stabilityai/stablelm-tuned-alpha-7b", "stablelm"),
    ("GPTNeoXForCausalLM", "EleutherAI/pythia-1.4b", None),
    ("StableLmForCausalLM", "stabilityai/stablelm-2-zephyr-1_6b", "stablelm-zephyr"),
    ("StableLmForCausalLM", "stabilityai/stablelm-2-1_6b-chat", "chatml"),
    ("StableLmForCausalLM", "stabilityai/stablelm-3b-4e1t", None),
    ("Phi3ForCausalLM", "microsoft/Phi-3.5-mini-instruct", "phi-3"),
    ("Phi3ForCausalLM", "microsoft/phi-4", None),  # Phi-4 (14B) has a format of its own
    ("Qwen3ForCausalLM", "/models/my-finetune", "qwen3"),
    ("OPTForCausalLM", "facebook/opt-1.3b", None),
    (None, "Qwen/Qwen3-8B", "qwen3"),  # a hub id before its config is known
    (None, "microsoft/Phi-3-mini-4k-instruct", "phi-3"),
    ("Gemma2ForCausalLM", "/models/my-finetune", "gemma"),
    ("Gemma3ForCausalLM", "google/gemma-3-1b-it", "gemma"),
    (None, "google/gemma-2-9b-it", "gemma"),
    # A known architecture rules out other families' names.
    ("LlamaForCausalLM", "my-dolly-llama", None),
])
def test_formats_are_chosen_by_architecture_and_name(architecture, name, expected):
    chosen = chat_format_for([architecture] if architecture else [], [name])
    assert (chosen.name if chosen else None) == expected


def test_gemmas_format_is_the_prompt_gemmas_own_template_makes():
    """FastChat 0.2.36 has no Gemma template; this one must give Gemma's turns exactly."""
    pytest.importorskip("fastchat")
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a prime."}]
    assert _fastchat_prompt(FORMATS["gemma"].conv_template(), messages) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nName a prime.<end_of_turn>\n<start_of_turn>model\n"
    )


def _checkpoint_copy(source: Path, folder: Path, keep_template: bool) -> Path:
    shutil.copytree(source, folder)
    if not keep_template:
        (folder / "chat_template.jinja").unlink()
    return folder


def test_the_worker_reports_the_family_format(checkpoint, tmp_path, monkeypatch):
    pytest.importorskip("fastchat")
    dolly = _checkpoint_copy(checkpoint("gpt-neox"), tmp_path / "dolly-v2-tiny", False)
    assert resolve_conv_template(None, str(dolly), ["dolly-v2-tiny"])["name"] == "dolly_v2"
    phi = _checkpoint_copy(checkpoint("phi3"), tmp_path / "tiny", True)
    assert resolve_conv_template(None, str(phi), ["phi-3-mini"]) == FORMATS["phi-3"].conv_template()
    gemma = _checkpoint_copy(checkpoint("gemma2"), tmp_path / "tiny-it", True)
    assert resolve_conv_template(None, str(gemma), ["tiny-it"]) == FORMATS["gemma"].conv_template()
    # FastChat would give any "stablelm" name StableLM-alpha's format; for StableLM 2 that is
    # wrong, so a base model falls back to FastChat's default, as for a model it does not know.
    stablelm = _checkpoint_copy(checkpoint("stablelm"), tmp_path / "stablelm-tiny", True)
    assert resolve_conv_template(None, str(stablelm), ["stablelm-tiny"])["name"] == "one_shot"
    for module in ("fastchat", "fastchat.conversation", "fastchat.model.model_adapter"):
        monkeypatch.setitem(sys.modules, module, None)  # as if fschat were not installed
    assert resolve_conv_template(None, str(phi), ["phi-3-mini"])["name"] == "phi-3"


def test_the_engine_renders_chat_with_the_family_format(checkpoint, tmp_path):
    """An OpenAssistant-named GPT-NeoX checkpoint without a chat template chats in its format;
    a base Pythia-named one still asks for a template."""
    oasst = _checkpoint_copy(checkpoint("gpt-neox"), tmp_path / "oasst-sft-pythia-tiny", False)
    llm = LLM(str(oasst), num_kv_blocks=16)
    messages = [{"role": "user", "content": "Hi"}]
    assert llm.engine.render_chat(messages) == "<|prompter|>Hi<|endoftext|><|assistant|>"
    (output,) = llm.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)
    assert output.prompt == "<|prompter|>Hi<|endoftext|><|assistant|>"
    llm.engine.check_no_leaks()

    pythia = _checkpoint_copy(checkpoint("gpt-neox"), tmp_path / "pythia-tiny", False)
    with pytest.raises(InvalidParameter, match="no chat template"):
        LLM(str(pythia), num_kv_blocks=16).engine.render_chat(messages)
