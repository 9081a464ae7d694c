"""Decoder LLM measures decided without a model: which tokens a perplexity window scores, greedy agreement."""

from __future__ import annotations

import pytest


def test_perplexity_windows_score_every_token_but_the_first_exactly_once():
    from optcli.llm.perplexity import windows

    for n, context, stride in [(100, 64, 32), (64, 64, 64), (65, 64, 16), (1000, 128, 100)]:
        scored = []
        for begin, end, count in windows(n, context, stride):
            assert end - begin <= context and count <= end - begin
            scored += list(range(end - count, end))
        assert scored == list(range(1, n))


def test_greedy_agreement_is_the_share_of_identical_positions_in_the_first_32_tokens():
    from optcli.llm.generate import greedy_agreement

    reference = [list(range(40)), list(range(40))]
    changed = [list(range(40)), [*range(16), *[-1] * 24]]
    assert greedy_agreement(reference, changed) == pytest.approx((32 + 16) / 64)
