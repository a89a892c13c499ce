"""engine/text/reasoning.py: the incremental think-tag split, tag detection, the budget forcer,
and the composed grammar (free thinking, enforced answer), without a server."""

from __future__ import annotations

import json

import pytest

from engine.text.reasoning import DEEPSEEK, ReasoningParser, ThinkingBudget, compose_grammar, detect_tags, prompt_opens

TEXT = "<think>\nLet me see: 2 < 3 and </th is not a tag.\n</think>\n\nThe answer is 4."
REASONING = "Let me see: 2 < 3 and </th is not a tag.\n"
CONTENT = "The answer is 4."


def split(chunks: list[str], opened: bool = False) -> tuple[str, str, list[tuple[str, str]]]:
    p = ReasoningParser(DEEPSEEK, opened)
    parts = [p.feed(c) for c in chunks] + [p.finish()]
    return "".join(r for r, _ in parts), "".join(c for _, c in parts), parts


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 100])
def test_split_any_chunking(size: int) -> None:
    chunks = [TEXT[i:i + size] for i in range(0, len(TEXT), size)]
    reasoning, content, parts = split(chunks)
    assert (reasoning, content) == (REASONING, CONTENT)
    for r, c in parts:  # no piece of a tag ever leaks into either side
        assert "<think" not in c and "</" not in c and "think>" not in c
        assert "<think>" not in r and "</think>" not in r


def test_every_split_point() -> None:
    for cut in range(len(TEXT) + 1):
        for cut2 in range(cut, len(TEXT) + 1, 7):
            assert split([TEXT[:cut], TEXT[cut:cut2], TEXT[cut2:]])[:2] == (REASONING, CONTENT), (cut, cut2)


def test_opened_by_prompt_and_unfinished() -> None:
    body = TEXT[len("<think>"):]
    assert split([body[:10], body[10:]], opened=True)[:2] == (REASONING, CONTENT)
    # cut off inside the thinking (max_tokens): everything is reasoning, a partial end tag included
    assert split(["\nthinking ... </thi"], opened=True)[:2] == ("thinking ... </thi", "")


def test_no_thinking_is_content() -> None:
    assert split(["Hello", " <think> is just text"])[:2] == ("", "Hello <think> is just text")
    assert split(["  <thi"])[:2] == ("", "<thi")  # ended while undecided


def test_detect_tags() -> None:
    class Vocab:
        def __init__(self, single: bool) -> None:
            self.single = single

        def encode(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
            return [1] if self.single else [1, 2, 3]

    assert detect_tags("auto", "{{ '<|im_start|>assistant\\n<think>\\n' }}") == DEEPSEEK
    assert detect_tags("auto", "{{ messages }}", Vocab(False)) is None
    assert detect_tags("auto", "{{ messages }}", Vocab(True)) == DEEPSEEK
    assert detect_tags("none", "<think>") is None
    assert detect_tags("deepseek", None) == DEEPSEEK
    with pytest.raises(ValueError):
        detect_tags("qwen", None)
    assert prompt_opens("<|im_start|>assistant\n<think>\n", DEEPSEEK)
    assert not prompt_opens("<|im_start|>assistant\n<think>\n\n</think>\n\n", DEEPSEEK)


def test_budget_forces_end_tag() -> None:
    vocab = {1: b"a", 2: b" b", 3: b"</", 4: b"think", 5: b">", 6: b"<think>", 7: b"x"}
    b = ThinkingBudget(DEEPSEEK, 3, [3, 4, 5], vocab.__getitem__)
    b.accept(6)  # <think>
    assert b.active and b.next_forced() is None
    for t in (1, 2, 1):
        assert b.next_forced() is None
        b.accept(t)
    forced = []
    while b.active:
        t = b.next_forced()
        forced.append(t)
        b.accept(t)
    assert forced == [3, 4, 5] and b.thinking_tokens == 6
    # no thinking at all: inactive after the first token
    b = ThinkingBudget(DEEPSEEK, 3, [3, 4, 5], vocab.__getitem__)
    b.accept(7)
    assert not b.active
    # the model closes on its own within the budget: nothing forced
    b = ThinkingBudget(DEEPSEEK, 10, [3, 4, 5], vocab.__getitem__, opened=True)
    for t in (1, 3, 4, 5):
        assert b.next_forced() is None
        b.accept(t)
    assert not b.active
    # budget 0 with an opened block: the end tag comes first
    b = ThinkingBudget(DEEPSEEK, 0, [3, 4, 5], vocab.__getitem__, opened=True)
    assert b.next_forced() == 3


def test_composed_grammar_frees_thinking_only() -> None:
    import llguidance as llg

    from engine.constrained.grammars import json_schema

    inner = json_schema({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}).grammar
    composed = json.loads(compose_grammar(inner, DEEPSEEK, opened=True))
    assert composed["grammars"][1]["name"] == "answer"
    tok = llg.LLTokenizer(llg.TokenizerWrapper(_ByteTok()), n_vocab=257, eos_token=[256])

    def accepts(text: str, opened: bool) -> bool:
        m = llg.LLMatcher(tok, compose_grammar(inner, DEEPSEEK, opened), log_level=0)
        ok = all(m.consume_token(b) for b in text.encode())
        return ok and m.is_accepting()

    assert accepts('free {"a": text} </th <x>\n</think>\n{"a":5}', True)
    assert not accepts('free</think>{"a":"no"}', True)
    assert not accepts('free </think> not json', True)
    assert accepts('<think>hm</think>{"a":1}', False) and accepts('{"a":1}', False)


class _ByteTok:
    """A byte-level vocabulary for llguidance: token i is byte i, 256 is the end."""

    eos_token_id = 256
    bos_token_id = None
    special_token_ids = [256]
    tokens = [bytes([i]) for i in range(256)] + [b"</s>"]

    def __call__(self, text: str) -> list[int]:
        return list(text.encode())


def test_composed_lark_answer() -> None:
    import llguidance as llg

    tok = llg.LLTokenizer(llg.TokenizerWrapper(_ByteTok()), n_vocab=257, eos_token=[256])
    g = compose_grammar('start: "yes" | "no"', DEEPSEEK, opened=True)
    m = llg.LLMatcher(tok, g, log_level=0)
    assert all(m.consume_token(b) for b in b"think</think>yes") and m.is_accepting()


def test_sampler_forces_token_and_leaves_plain_greedy_after() -> None:
    import torch

    from engine.core.sampling import Sampler, SamplingParams, is_plain_greedy

    vocab = {i: bytes([97 + i]) for i in range(8)} | {5: b"</think>"}
    budget = ThinkingBudget(DEEPSEEK, 2, [5], vocab.__getitem__, opened=True)

    class Seq:
        def __init__(self) -> None:
            self.params = SamplingParams(temperature=0.7, seed=1, token_forcer=budget, max_tokens=10)
            self.token_ids, self.prompt_token_ids = [0], [0]
            self.generator = torch.Generator().manual_seed(1)

    s, sampler, logits = Seq(), Sampler(8), torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, -50.0, 0.0, 0.0]])
    drawn = [sampler(logits, [s]).token_ids[0] for _ in range(3)]
    assert drawn[2] == 5 and 5 not in drawn[:2] and not budget.active
    s.params.temperature = 0.0
    assert is_plain_greedy(s)  # the forcer is done: the decode graph's argmax may stand in again


def test_settings_flag_env_and_validation() -> None:
    import argparse

    from api.cli_serve import add_serve_args
    from api.server import SettingsError, load_settings

    p = argparse.ArgumentParser()
    add_serve_args(p)
    args = p.parse_args(["--reasoning-format", "deepseek", "--reasoning-budget", "32"])
    assert (args.reasoning_format, args.reasoning_budget) == ("deepseek", 32)

    s = load_settings({"reasoning_format": "none", "reasoning_budget": 7}, env={})
    assert (s.reasoning_format, s.reasoning_budget) == ("none", 7)
    s = load_settings({}, env={"LLAMATRON_REASONING_FORMAT": "deepseek", "LLAMATRON_REASONING_BUDGET": "0"})
    assert (s.reasoning_format, s.reasoning_budget) == ("deepseek", 0)
    assert load_settings({}, env={}).reasoning_format == "auto"
    with pytest.raises(SettingsError):
        load_settings({"reasoning_format": "qwen"}, env={})
    with pytest.raises(SettingsError):
        load_settings({"reasoning_budget": -2}, env={})
