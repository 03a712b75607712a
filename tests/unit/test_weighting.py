"""A1111 prompt-weighting syntax (``worker/adapters/weighting``): the weights AUTOMATIC1111's
``parse_prompt_attention`` gives, escapes literal, and which prompts need compel at all."""

from __future__ import annotations

import pytest

from schemas import parse_request
from worker.adapters.weighting import has_syntax, parse_attention, plain_text
from worker.inputs.prepare import prepare


@pytest.mark.parametrize(("text", "parsed"), [
    ("a red fox", [("a red fox", 1.0)]),
    ("a (red:1.5) fox", [("a ", 1.0), ("red", 1.5), (" fox", 1.0)]),
    ("(red)", [("red", pytest.approx(1.1))]),
    ("((red))", [("red", pytest.approx(1.21))]),
    ("[red]", [("red", pytest.approx(1 / 1.1))]),
    ("((red:1.5) fox)", [("red", pytest.approx(1.65)), (" fox", pytest.approx(1.1))]),
    ("(open", [("open", pytest.approx(1.1))]),  # left open: to the end, as A1111
    (r"\(literal\) \[x\]", [("(literal) [x]", 1.0)]),
    ("C++ - a+b", [("C++ - a+b", 1.0)]),  # compel's +/- syntax is not read
])
def test_weights_follow_a1111(text: str, parsed: list) -> None:
    assert parse_attention(text) == parsed


def test_the_plain_text_drops_the_syntax() -> None:
    assert plain_text(r"a (red:1.5) [fox] \(x\)") == "a red fox (x)"


def test_only_brackets_and_escapes_are_syntax() -> None:
    assert not has_syntax("a red fox, 4k, C++ - x+y") and not has_syntax(None)
    assert has_syntax("a (red) fox") and has_syntax("[x]") and has_syntax(r"a \ b")


def plan_for(**fields: object) -> tuple:
    request = parse_request({"prompt": "p", **fields})
    return prepare(request, (4,), "off", lambda text: len(text.split()) + 2)


class TestWhichPromptsAreWeighted:
    def test_a_plain_short_prompt_keeps_diffusers_encoding(self) -> None:
        plan, warnings = plan_for(prompt="a red fox")
        assert not plan.weighted and warnings == []

    def test_syntax_or_length_turns_it_on_and_long_prompts_are_not_cut(self) -> None:
        assert plan_for(prompt="a (red:1.3) fox")[0].weighted
        plan, warnings = plan_for(prompt="word " * 100)
        assert plan.weighted and warnings == []

    def test_prompt_weighting_false_keeps_the_text_and_the_warning(self) -> None:
        plan, warnings = plan_for(prompt="word " * 100, prompt_weighting=False)
        assert not plan.weighted
        assert warnings == ["prompt is 102 CLIP tokens; only the first 77 were used"]
        assert not plan_for(prompt="(red)", prompt_weighting=False)[0].weighted

    def test_weighted_plans_batch_only_with_the_same_prompts(self) -> None:
        a = plan_for(prompt="a (red) fox", seed=1)[0]
        b = plan_for(prompt="a (red) fox", seed=2)[0]
        c = plan_for(prompt="a (blue) fox", seed=1)[0]
        plain = [plan_for(prompt=text)[0] for text in ("a red fox", "a blue fox")]
        assert a.shape_key == b.shape_key != c.shape_key
        assert plain[0].shape_key == plain[1].shape_key != a.shape_key
