"""Batched sampler on fake logits, and stop-string handling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from engine.core.sampling import Sampler, SamplingParams, StopChecker, token_logprobs

V = 8
EOG = 7


@dataclass
class Row:
    params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=lambda: [0])
    token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        self.token_ids = self.token_ids or list(self.prompt_token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)


def sample(logits, rows):
    return Sampler(V, {EOG})(torch.as_tensor(logits, dtype=torch.float32), rows)


BASE = [0.0, 1.0, 3.0, 2.0, -1.0, 0.5, 0.0, 2.5]


def test_greedy_is_argmax() -> None:
    out = sample([BASE, BASE[::-1]], [Row(SamplingParams(temperature=0)), Row(SamplingParams(temperature=0))])
    assert out.token_ids == [2, 5]


def test_logit_bias_and_logprobs_before_temperature() -> None:
    p = SamplingParams(temperature=0, logit_bias={4: 10.0}, logprobs=2)
    out = sample([BASE], [Row(p)])
    assert out.token_ids == [4]
    biased = torch.tensor(BASE)
    biased[4] += 10
    ref = torch.log_softmax(biased, -1)
    lp = out.logprobs[0]
    assert lp.token_id == 4 and math.isclose(lp.logprob, ref[4].item(), rel_tol=1e-5)
    assert [t for t, _ in lp.top] == [4, 2]
    # temperature does not change the reported distribution
    out_t = sample([BASE], [Row(SamplingParams(temperature=0.3, logit_bias={4: 10.0}, logprobs=2, seed=1))])
    assert math.isclose(out_t.logprobs[0].top[0][1], ref[4].item(), rel_tol=1e-5)


def test_no_logprobs_unless_asked() -> None:
    out = sample([BASE, BASE], [Row(SamplingParams(temperature=0)), Row(SamplingParams(temperature=0, logprobs=0))])
    assert out.logprobs[0] is None and out.logprobs[1].top == []


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    for p in (SamplingParams(temperature=5.0, top_k=1, seed=3), SamplingParams(temperature=5.0, top_p=1e-6, seed=3)):
        assert all(sample([BASE], [Row(p)]).token_ids == [2] for _ in range(10))


def draws(p: SamplingParams, n: int, logits=BASE) -> list[int]:
    row = Row(p)
    return [sample([logits], [row]).token_ids[0] for _ in range(n)]


def test_sampling_follows_the_distribution() -> None:
    got = draws(SamplingParams(temperature=1.0, seed=0), 3000)
    probs = torch.softmax(torch.tensor(BASE), -1)
    for t in range(V):
        assert abs(got.count(t) / 3000 - probs[t].item()) < 0.03


def test_top_k_top_p_min_p_restrict_the_support() -> None:
    assert set(draws(SamplingParams(top_k=3, seed=0), 300)) == {2, 7, 3}
    # top_p 0.6: 2 (0.40) and 7 (0.24) are needed to reach 0.6
    assert set(draws(SamplingParams(top_p=0.6, seed=0), 300)) == {2, 7}
    # min_p 0.5: tokens with p >= 0.5 * p(2): 2 (e^3), 7 (e^2.5), 3 (e^2 > 0.5 e^3 ? 7.39 > 10.04: no)
    assert set(draws(SamplingParams(min_p=0.5, seed=0), 300)) == {2, 7}


def test_same_seed_same_output_whatever_the_batch() -> None:
    flat = [0.0] * V
    alone = draws(SamplingParams(seed=42), 20, flat)
    row = Row(SamplingParams(seed=42))
    mixed = []
    for i in range(20):
        others = [Row(SamplingParams(temperature=0)), Row(SamplingParams(seed=i)), Row(SamplingParams())]
        batch = others[: i % 3] + [row] + others[i % 3 :]
        mixed.append(sample([flat] * 4, batch).token_ids[i % 3])
    assert mixed == alone
    assert draws(SamplingParams(seed=43), 20, flat) != alone


def test_repetition_presence_frequency_penalties() -> None:
    logits = [2.0, -2.0, 1.9, 0, 0, 0, 0, 0]
    # token 0 was seen in the prompt: 2.0 / 2 = 1.0 < 1.9
    assert sample([logits], [Row(SamplingParams(temperature=0, repetition_penalty=2.0), [0])]).token_ids == [2]
    pen = Sampler(V, {EOG})
    row = Row(SamplingParams(temperature=0, logprobs=None, presence_penalty=0.5, frequency_penalty=0.25),
              prompt_token_ids=[3], token_ids=[3, 2, 2])
    lg = torch.tensor([logits])
    pen._apply_penalties(lg, [row])
    assert lg[0, 2].item() == pytest.approx(1.9 - 0.5 - 0.5)  # twice in the output
    assert lg[0, 3].item() == 0.0  # prompt-only tokens get no presence/frequency penalty
    neg = torch.tensor([logits])
    pen._apply_penalties(neg, [Row(SamplingParams(repetition_penalty=2.0), [1])])
    assert neg[0, 1].item() == -4.0  # negative logits are multiplied


def test_min_tokens_bans_eog_and_stop_ids() -> None:
    logits = [0, 0, 0, 0, 0, 9.0, 0, 10.0]
    p = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5])
    assert sample([logits], [Row(p, [0], [0])]).token_ids == [0]  # 0 outputs so far: EOG and 5 banned
    assert sample([logits], [Row(p, [0], [0, 1])]).token_ids == [0]  # 1 output so far
    assert sample([logits], [Row(p, [0], [0, 1, 2])]).token_ids == [7]


class OnlyEven:
    def __init__(self, fail: bool = False) -> None:
        self.accepted: list[int] = []
        self.fail = fail

    def fill_mask(self, row: torch.Tensor) -> None:
        if self.fail:
            raise RuntimeError("boom")
        row[1::2] = float("-inf")

    def accept(self, token_id: int) -> None:
        self.accepted.append(token_id)

    def is_terminated(self) -> bool:
        return False


def test_grammar_hook_masks_and_accepts() -> None:
    g, bad = OnlyEven(), OnlyEven(fail=True)
    rows = [Row(SamplingParams(temperature=0, grammar=g)), Row(SamplingParams(temperature=0, grammar=bad)),
            Row(SamplingParams(temperature=0))]
    out = sample([BASE] * 3, rows)
    assert out.token_ids[0] == 2 and g.accepted == [2]
    assert out.errors[1] and "boom" in out.errors[1] and bad.accepted == []
    assert out.errors[0] is None and out.errors[2] is None and out.token_ids[2] == 2
    odd_best = [0, 5.0, 1.0, 5.0, 0, 5.0, 0, 5.0]
    assert sample([odd_best], [Row(SamplingParams(seed=1, grammar=OnlyEven()))]).token_ids[0] % 2 == 0


def test_token_logprobs_helper() -> None:
    lp = torch.log_softmax(torch.tensor([BASE, BASE]), -1)
    out = token_logprobs(lp, torch.tensor([1, 2]), 3)
    assert [o.token_id for o in out] == [1, 2]
    assert [t for t, _ in out[0].top] == [2, 7, 3]
    assert out[1].logprob == pytest.approx(lp[1, 2].item())


def test_params_validation() -> None:
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)


# ---- stop strings -------------------------------------------------------------------------------
def feed(checker: StopChecker, pieces: list[str]) -> tuple[str, str | None]:
    text = ""
    for p in pieces:
        t, m = checker.add(p)
        text += t
        if m is not None:
            return text, m
    return text + checker.flush(), None


def test_stop_string_across_token_boundaries() -> None:
    assert feed(StopChecker(["END"]), ["Hello E", "N", "D and more"]) == ("Hello ", "END")
    assert feed(StopChecker(["END"], include_stop=True), ["Hello E", "ND!"]) == ("Hello END", "END")


def test_possible_stop_prefix_is_held_back_then_released() -> None:
    c = StopChecker(["\n\nUser:"])
    assert c.add("Hi\n") == ("Hi", None)
    assert c.add("\nUs") == ("", None)
    assert c.add("e") == ("", None)
    assert c.add("d") == ("\n\nUsed", None)  # not the stop string after all
    assert c.flush() == ""


def test_earliest_stop_wins_and_tail_is_flushed() -> None:
    assert feed(StopChecker(["b", "abc"]), ["xab", "c"]) == ("xa", "b")
    assert feed(StopChecker(["zzz"]), ["ends with z", "z"]) == ("ends with zz", None)


def test_no_stop_strings_pass_through() -> None:
    c = StopChecker([])
    assert c.add("abc") == ("abc", None) and c.flush() == ""
