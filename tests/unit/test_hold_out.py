"""The automatic hold-out (dpo_trainer.io.data.split_held_out): no prompt on both sides, the same
split every time, bounded."""

from __future__ import annotations

import pytest
from dpo_contract.config import HoldOut
from dpo_contract.pod import BadInputError
from dpo_trainer.io.data import split_held_out
from hypothesis import given
from hypothesis import strategies as st

PAIRS = st.lists(
    st.builds(
        lambda prompt, n: {"prompt": f"q{prompt}", "chosen": f"a{n}", "rejected": f"b{n}"},
        st.integers(0, 40),
        st.integers(0, 10_000),
    ),
    min_size=2,
    max_size=200,
).filter(lambda pairs: len({p["prompt"] for p in pairs}) > 1)
HOLD_OUTS = st.builds(
    lambda fraction, most: HoldOut(fraction=fraction, max_pairs=most),
    st.floats(0.01, 0.5),
    st.integers(1, 50),
)


@given(PAIRS, HOLD_OUTS)
def test_no_prompt_is_both_trained_on_and_held_out(
    pairs: list[dict[str, str]], hold_out: HoldOut
) -> None:
    trained, held = split_held_out(pairs, hold_out)
    assert held, "the gate always gets pairs"
    assert trained, "training always keeps pairs"
    assert not {p["prompt"] for p in trained} & {p["prompt"] for p in held}
    assert sorted(map(str, trained + held)) == sorted(map(str, pairs)), "every pair, once"
    first_prompt = max(sum(p["prompt"] == q["prompt"] for q in pairs) for p in held)
    assert len(held) <= max(hold_out.max_pairs, first_prompt), "bounded (one prompt at least)"
    assert split_held_out(list(reversed(pairs)), hold_out)[1] == list(reversed(held)), (
        "the same pairs held out whatever the order"
    )


def test_the_default_holds_out_about_five_percent_of_the_prompts() -> None:
    pairs = [{"prompt": f"question {i}", "chosen": "yes", "rejected": "no"} for i in range(4000)]
    _, held = split_held_out(pairs, HoldOut(fraction=0.05, max_pairs=2000))
    assert 0.04 < len(held) / len(pairs) < 0.06
    _, capped = split_held_out(pairs, HoldOut(fraction=0.05, max_pairs=50))
    assert len(capped) == 50
    assert {p["prompt"] for p in capped} <= {p["prompt"] for p in held}, "a cap keeps a subset"


def test_one_prompt_cannot_be_split() -> None:
    pairs = [{"prompt": "same", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(10)]
    with pytest.raises(BadInputError, match=r"give data\.eval or evalGate\.data"):
        split_held_out(pairs, HoldOut(fraction=0.05, max_pairs=2000))
