"""Constrained output: grammars (JSON schema, GBNF, Lark, regex) via llguidance, tool-call formats and parsers."""
