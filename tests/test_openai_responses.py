"""The Responses API through the openai SDK: plain and streamed responses, instructions,
max_output_tokens, continuing a stored response, and what is refused (function tools are in
test_openai_responses_tools.py)."""

from __future__ import annotations

import httpx
import pytest
from openai import BadRequestError, NotFoundError, OpenAI

from pagoda.adapters.openai.response_store import ResponseStore, StoredResponse


@pytest.fixture(scope="module")
def client(openai_server) -> OpenAI:
    return OpenAI(base_url=openai_server.v1, api_key=openai_server.api_key, max_retries=0)


def chat_text(client: OpenAI, model: str, messages: list[dict], max_tokens: int) -> str:
    """The same conversation through chat completions (the reference for greedy replies)."""
    response = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0,
    )
    return response.choices[0].message.content


def test_plain_response(client, openai_server):
    response = client.responses.create(
        model=openai_server.model, input="Tell me about paging.", max_output_tokens=8,
        temperature=0, extra_body={"ignore_eos": True},
    )
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    expected = chat_text(client, openai_server.model,
                         [{"role": "user", "content": "Tell me about paging."}], 8)
    assert response.output_text == expected
    assert response.usage.output_tokens == 8
    assert response.usage.total_tokens == response.usage.input_tokens + 8
    assert client.responses.retrieve(response.id).output_text == expected


def test_instructions_and_message_input(client, openai_server):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "How are you?"}]},
    ]
    response = client.responses.create(
        model=openai_server.model, input=messages, instructions="Be brief.",
        max_output_tokens=6, temperature=0,
    )
    expected = chat_text(client, openai_server.model, [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"},
    ], 6)
    assert response.output_text == expected
    assert response.instructions == "Be brief."


def test_previous_response_id_continues_the_conversation(client, openai_server):
    first = client.responses.create(
        model=openai_server.model, input="Name a color.", instructions="Answer in one word.",
        max_output_tokens=5, temperature=0,
    )
    second = client.responses.create(
        model=openai_server.model, input="And another?", previous_response_id=first.id,
        max_output_tokens=5, temperature=0,
    )
    # The first turn's instructions are not carried over.
    expected = chat_text(client, openai_server.model, [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And another?"},
    ], 5)
    assert second.output_text == expected
    assert second.previous_response_id == first.id
    unstored = client.responses.create(
        model=openai_server.model, input="x", max_output_tokens=2, store=False,
    )
    with pytest.raises(BadRequestError) as caught:
        client.responses.create(model=openai_server.model, input="y",
                                previous_response_id=unstored.id)
    assert caught.value.body["param"] == "previous_response_id"
    with pytest.raises(NotFoundError):
        client.responses.retrieve(unstored.id)


def test_streamed_events(client, openai_server):
    stream = client.responses.create(
        model=openai_server.model, input="Tell me about paging.", max_output_tokens=10,
        temperature=0, stream=True,
    )
    events = list(stream)
    types = [event.type for event in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas == final.output_text == events[-4].text
    whole = client.responses.create(
        model=openai_server.model, input="Tell me about paging.", max_output_tokens=10,
        temperature=0,
    )
    assert final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    # The SDK's stream helper accumulates the deltas into its snapshot of the response.
    with client.responses.stream(model=openai_server.model, input="Tell me about paging.",
                                 max_output_tokens=10, temperature=0) as helper:
        snapshots = [e.snapshot for e in helper if e.type == "response.output_text.delta"]
    assert snapshots[-1] == whole.output_text


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "tools": [{"type": "file_search"}]}, "tools"),
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type"),
    ({"input": "x", "text": {"format": {"type": "json_object"}}}, "text.format"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "previous_response_id": "resp_unknown"}, "previous_response_id"),
])
def test_refusals_name_the_field(openai_server, body, param):
    response = httpx.post(f"{openai_server.v1}/responses", json=body,
                          headers=openai_server.headers, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_store_bound_and_expiry(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("pagoda.adapters.openai.response_store.time.monotonic", lambda: now[0])
    store = ResponseStore(max_entries=2, ttl_seconds=10)
    for name in ("a", "b", "c"):
        store.put(name, StoredResponse({}, []))
    assert store.get("a") is None and len(store) == 2  # the oldest is dropped
    now[0] += 10.5
    assert store.get("c") is None and len(store) == 0  # expired
