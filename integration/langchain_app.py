"""A LangChain app on Pagoda: prompt template -> ChatOpenAI (pointed at `pagoda serve`) -> text,
streamed token by token.

    pagoda serve &
    python integration/langchain_app.py "What is a paged KV cache?"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import Runnable
from langchain_openai import ChatOpenAI

PROMPT = ChatPromptTemplate.from_messages([
    ("system", "You are a concise assistant. Answer in {language}."),
    ("human", "{question}"),
])


def build_chain(
    base_url: str, model: str, api_key: str, max_tokens: int, seed: int | None = None
) -> Runnable:
    """The chain: any OpenAI-compatible base URL works, Pagoda's is http://HOST:PORT/v1.

    A seed makes the sampled answer reproducible (Pagoda honours OpenAI's `seed` per request).
    """
    llm = ChatOpenAI(base_url=base_url, model=model, api_key=api_key, temperature=0.7,
                     max_completion_tokens=max_tokens, seed=seed, streaming=True, max_retries=1)
    return PROMPT | llm | StrOutputParser()


def stream_answer(chain: Runnable, question: str, language: str = "English") -> Iterator[str]:
    """The answer's text pieces as Pagoda streams them."""
    return chain.stream({"question": question, "language": language})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question")
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--model", default="pagoda-demo")
    # Pagoda checks the key only when started with --api-key; the client needs some value.
    parser.add_argument("--api-key", default="unused")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=None, help="sample reproducibly")
    args = parser.parse_args(argv)
    chain = build_chain(args.base_url, args.model, args.api_key, args.max_tokens, args.seed)
    for piece in stream_answer(chain, args.question):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
