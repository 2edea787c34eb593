"""`choice` specs as grammars: one alternative per string, quoted as JSON quotes strings (a
literal in both GBNF, which xgrammar reads, and Lark, which llguidance reads)."""

from __future__ import annotations

import json


def choice_grammar(choices: tuple[str, ...], root: str) -> str:
    return f"{root} ::= " + " | ".join(json.dumps(choice) for choice in choices)


def choice_lark(choices: tuple[str, ...]) -> str:
    return "start: " + " | ".join(json.dumps(choice) for choice in choices)
