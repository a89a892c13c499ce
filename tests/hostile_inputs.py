"""Inputs that used to take the server down, shared by the grammar unit tests and the server test."""

from __future__ import annotations


def gbnf_chain(n: int) -> str:
    """A GBNF grammar of n + 2 rules, each referring to the next (llguidance's converter is
    quadratic in the rule count)."""
    return "root ::= r0\n" + "".join(f'r{i} ::= "a" r{i + 1}\n' for i in range(n)) + f'r{n} ::= "b"\n'


def nested_schema(levels: int) -> dict:
    """A JSON schema whose objects nest `levels` deep (a RecursionError in the schema walkers)."""
    d: dict = {"type": "object"}
    for _ in range(levels):
        d = {"type": "object", "properties": {"a": d}}
    return d
