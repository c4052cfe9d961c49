"""JSON schemas as llama.cpp grammars: numeric bounds written as digit ranges, and what is still
refused. No model: the grammars are read back as regular expressions (the ones made here have
no recursion), so that a test can ask which texts they accept. That llama.cpp's own sampler
agrees is tested in integration/test_json_bounds.py."""

from __future__ import annotations

import json
import random
import re

import pytest

from vllm_obtain.contract import EngineRequestError, JsonOutput
from vllm_obtain.engines.llama_cpp.grammar import gbnf_for, unenforced_keywords
from vllm_obtain.engines.llama_cpp.json_ranges import integer_range, number_range

SAFE = 2**53 - 1  # zod's z.number().int() bounds
_TOKEN = re.compile(r'\s+|"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|\{[0-9,]+\}|[()|?*+]|[\w-]+')


def as_regex(gbnf: str) -> re.Pattern[str]:
    """A GBNF grammar without recursion as a regular expression of its root."""
    rules = dict(line.split(" ::= ", 1) for line in gbnf.strip().splitlines())

    def expand(body: str, seen: tuple[str, ...]) -> str:
        out = []
        for token in _TOKEN.findall(body):
            if token.isspace():
                continue
            if token.startswith('"'):
                out.append(re.escape(json.loads(token)))
            elif token.startswith("[") or token.startswith("{") or token in "()|?*+":
                out.append("(?:" if token == "(" else token)
            else:
                assert token not in seen, f"recursive rule {token}"
                out.append(f"(?:{expand(rules[token], (*seen, token))})")
        return "".join(out)

    return re.compile(expand(rules["root"], ("root",)))


def accepts(gbnf: str, text: str) -> bool:
    return as_regex(gbnf).fullmatch(text) is not None


def grammar_of(schema: object) -> str:
    pytest.importorskip("llama_cpp", reason="the schema converter is llama-cpp-python's")
    return gbnf_for(JsonOutput(json.dumps(schema)))


def refusal(schema: object) -> str:
    with pytest.raises(EngineRequestError) as caught:
        grammar_of(schema)
    assert caught.value.param == "response_format"
    return str(caught.value)


# --- json_ranges: digit ranges ------------------------------------------------------------------


def test_integer_ranges_accept_exactly_their_integers_in_canonical_form():
    rng = random.Random(7)
    pairs = [(lo, hi) for lo in range(-25, 26, 5) for hi in range(lo, 26, 7)]
    pairs += [(lo, lo + rng.randrange(3000)) for lo in rng.sample(range(-5000, 5000), 40)]
    for low, high in pairs:
        regex = as_regex(f"root ::= {integer_range(low, high)}")
        for n in range(low - 120, high + 120):
            assert (regex.fullmatch(str(n)) is not None) == (low <= n <= high), (low, high, n)
        assert not regex.fullmatch("-0") and not regex.fullmatch("007")
    for _ in range(200):  # wide ranges, probed at their edges and here and there
        low = rng.choice([-1, 1]) * rng.randrange(10 ** rng.randrange(1, 12))
        high = low + rng.randrange(10 ** rng.randrange(1, 14))
        regex = as_regex(f"root ::= {integer_range(low, high)}")
        probes = [
            low - 1,
            low,
            high,
            high + 1,
            *(rng.randrange(low - 10**9, high + 10**9) for _ in range(30)),
        ]
        for n in probes:
            assert (regex.fullmatch(str(n)) is not None) == (low <= n <= high), (low, high, n)


def test_the_safe_integer_range_holds_at_its_edges_and_open_sides_stop_at_16_digits():
    safe = as_regex(f"root ::= {integer_range(-SAFE, SAFE)}")
    for n in (0, 7, -7, SAFE, -SAFE, SAFE - 1, 10**15, 8999999999999999, 9007199254740899):
        assert safe.fullmatch(str(n)), n
    for n in (SAFE + 1, -SAFE - 1, 9007199254740999, 9100000000000000, 10**16):
        assert not safe.fullmatch(str(n)), n
    at_least_5 = as_regex(f"root ::= {integer_range(5, None)}")
    assert at_least_5.fullmatch("9" * 16) and not at_least_5.fullmatch("1" + "0" * 16)
    assert not at_least_5.fullmatch("4") and at_least_5.fullmatch("5")
    assert integer_range(None, None) == '"-" ([1-9] [0-9]{0,15}) | "0" | [1-9] [0-9]{0,15}'


def test_an_empty_integer_range_is_an_error():
    with pytest.raises(ValueError, match="no integer"):
        integer_range(3, 2)


@pytest.mark.parametrize(
    ("low", "high", "low_excluded", "high_excluded", "inside", "outside"),
    [
        (0, 1, False, False, ["0", "1", "0.5", "0.999", "0.0001"], ["1.5", "-0.5", "2", "1e0"]),
        (0, None, True, False, ["0.1", "3", "12.25", "9" * 16], ["0", "-1", "0.0", "-0.5"]),
        (-90, 90, False, True, ["-90", "-89.5", "89.99", "0", "-0.5"], ["90", "90.1", "-90.5"]),
        (None, -2, False, False, ["-2", "-2.5", "-100.75"], ["-1.5", "-1", "0", "2"]),
        (-1, 1, True, True, ["0", "-0.9", "0.9"], ["-1", "1", "1.0", "-1.5"]),
        (3, 3, False, False, ["3"], ["3.5", "2.9", "4"]),
    ],
)
def test_number_ranges(low, high, low_excluded, high_excluded, inside, outside):
    gbnf = number_range(low, high, low_excluded=low_excluded, high_excluded=high_excluded)
    regex = as_regex(f"root ::= {gbnf}")
    for text in inside:
        assert regex.fullmatch(text), text
    for text in outside:
        assert not regex.fullmatch(text), text


def test_numbers_with_a_fraction_end_on_a_digit_that_is_not_zero():
    regex = as_regex(f"root ::= {number_range(0, 10, low_excluded=False, high_excluded=False)}")
    assert regex.fullmatch("2.05") and not regex.fullmatch("2.50") and not regex.fullmatch("2.")


@pytest.mark.parametrize("bound", [1, 10, 99, 12345, 10**14, 10**15])
def test_fractions_near_an_excluded_bound_never_parse_to_it(bound):
    below = as_regex(f"root ::= {number_range(0, bound, low_excluded=False, high_excluded=True)}")
    above = as_regex(f"root ::= {number_range(-bound, 0, low_excluded=True, high_excluded=False)}")
    too_long = f"{bound - 1}.{'9' * 17}"
    assert float(too_long) == bound and not below.fullmatch(too_long)
    nines = max((n for n in range(1, 20) if below.fullmatch(f"{bound - 1}.{'9' * n}")), default=0)
    assert nines >= 1 or bound >= 10**14  # no room for a fraction so close to 2**53
    if nines:
        assert float(f"{bound - 1}.{'9' * nines}") < bound
        assert above.fullmatch(f"-{bound - 1}.{'9' * nines}")
        assert float(f"-{bound - 1}.{'9' * nines}") > -bound


# --- gbnf_for: schemas --------------------------------------------------------------------------


def test_zods_safe_integer_schema_is_accepted_and_enforced():
    gbnf = grammar_of({"type": "integer", "minimum": -SAFE, "maximum": SAFE})
    assert accepts(gbnf, "42") and accepts(gbnf, f"-{SAFE}")
    assert not accepts(gbnf, str(SAFE + 1)) and not accepts(gbnf, "4.5")


def test_bounded_integer_property_in_an_object():
    schema = {
        "type": "object",
        "properties": {"day": {"type": "integer", "minimum": 1, "maximum": 30}},
        "required": ["day"],
        "additionalProperties": False,
    }
    gbnf = grammar_of(schema)
    for day in range(-40, 400):
        assert accepts(gbnf, f'{{"day": {day}}}') == (1 <= day <= 30), day


@pytest.mark.parametrize(
    ("bounds", "lowest", "highest"),
    [
        ({"exclusiveMinimum": 0, "exclusiveMaximum": 10}, 1, 9),
        ({"minimum": 0, "exclusiveMinimum": True, "maximum": 10}, 1, 10),  # draft 4
        ({"minimum": 0, "exclusiveMinimum": False, "maximum": 10}, 0, 10),
        ({"minimum": 1.5, "maximum": 9.5}, 2, 9),
        ({"exclusiveMinimum": 1.5, "exclusiveMaximum": 9.5}, 2, 9),
        ({"minimum": 2, "exclusiveMinimum": 2, "maximum": 8, "exclusiveMaximum": 9}, 3, 8),
        ({"minimum": -(10**20), "maximum": -7}, -(10**20), -7),  # as wide as asked
    ],
)
def test_exclusive_and_fractional_bounds_on_integers(bounds, lowest, highest):
    regex = as_regex(grammar_of({"type": "integer", **bounds}))
    for n in (lowest - 1, lowest, highest, highest + 1):
        assert (regex.fullmatch(str(n)) is not None) == (lowest <= n <= highest), n


def test_a_list_of_types_keeps_its_bounds_and_other_keywords():
    gbnf = grammar_of({"type": ["integer", "null"], "minimum": 1, "maximum": 3})
    assert [accepts(gbnf, t) for t in ("0", "1", "3", "4", "null")] == [0, 1, 1, 0, 1]
    gbnf = grammar_of({"type": ["string", "null"], "maxLength": 2})
    assert accepts(gbnf, '"ab"') and not accepts(gbnf, '"abc"') and accepts(gbnf, "null")


def test_bounds_inside_anyof_and_refs_are_enforced():
    schema = {
        "type": "object",
        "properties": {
            "n": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
            "m": {"$ref": "#/$defs/Small"},
        },
        "required": ["n", "m"],
        "$defs": {"Small": {"type": "integer", "maximum": 5}},
    }
    gbnf = grammar_of(schema)
    assert accepts(gbnf, '{"n": 1, "m": 5}') and accepts(gbnf, '{"n": null, "m": -3}')
    assert not accepts(gbnf, '{"n": 0, "m": 5}') and not accepts(gbnf, '{"n": 1, "m": 6}')


def test_whole_number_bounds_on_numbers_are_enforced():
    gbnf = grammar_of({"type": "number", "minimum": 0, "maximum": 1})
    assert accepts(gbnf, "0.25") and accepts(gbnf, "1") and not accepts(gbnf, "1.5")
    assert not accepts(gbnf, "-0.5") and not accepts(gbnf, "1e-3")
    gbnf = grammar_of({"type": "number", "exclusiveMinimum": 0})  # zod .positive()
    assert accepts(gbnf, "0.5") and not accepts(gbnf, "0") and not accepts(gbnf, "-2")


def test_bounds_on_other_types_constrain_nothing():
    gbnf = grammar_of({"type": "string", "minimum": 3})
    assert accepts(gbnf, '"a"')


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "number", "minimum": 0.5}, "minimum (on a number, only whole-number bounds"),
        ({"type": "integer", "enum": [1, 50], "maximum": 30}, "maximum"),
        ({"type": "integer", "allOf": [{"minimum": 1}]}, "minimum"),
        ({"anyOf": [{"type": "integer"}], "minimum": 1}, "minimum"),
        ({"minimum": 1}, "minimum"),
        ({"type": "integer", "multipleOf": 5}, "multipleOf"),
    ],
)
def test_what_the_grammar_cannot_enforce_is_refused_by_name(schema, named):
    assert f"keywords: {named}" in refusal(schema)


def test_bounds_that_leave_nothing_are_refused():
    assert "no integer" in refusal({"type": "integer", "minimum": 5, "maximum": 4})
    assert "no number" in refusal({"type": "number", "exclusiveMinimum": 1, "maximum": 1})


def test_bounds_are_left_to_the_converter_and_the_other_keywords_found_at_any_depth():
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 1}},
        "$defs": {"x": {"type": "array", "uniqueItems": True}},
    }
    assert unenforced_keywords(schema) == {"uniqueItems"}
