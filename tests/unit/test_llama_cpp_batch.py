from vllm_obtain.engines.llama_cpp.grammar import unenforced_keywords
from vllm_obtain.engines.llama_cpp.sampling import client_seed_to_llama
from vllm_obtain.engines.llama_cpp.scheduler import shared_prefix


def test_client_seeds_map_into_llama_cpp_range_and_never_mean_random():
    assert client_seed_to_llama(5, fallback=0) == 5
    assert client_seed_to_llama(-1, fallback=0) == 0xFFFFFFFE  # -1 would be "random" (0xFFFFFFFF)
    assert client_seed_to_llama(2**40 + 7, fallback=0) == 7
    assert client_seed_to_llama(None, fallback=123) == 123


def test_shared_prefix_counts_leading_equal_tokens():
    assert shared_prefix([1, 2, 3, 4], (1, 2, 9)) == 2
    assert shared_prefix([], (1,)) == 0
    assert shared_prefix([1, 2], (1, 2, 3)) == 2


def test_schema_keywords_the_grammar_cannot_enforce_are_found_at_any_depth():
    schema = {
        "type": "object",
        "properties": {
            "maximum": {"type": "string", "maxLength": 3},  # a property *named* maximum
            "n": {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        },
        "$defs": {"x": {"type": "number", "multipleOf": 2}},
        "enum_holder": {"enum": [{"maximum": 1}]},
    }
    # Numeric bounds are enforced by the grammar now (grammar.py); what is left is refused.
    assert unenforced_keywords(schema) == {"uniqueItems", "multipleOf"}
    assert unenforced_keywords({"type": "object", "properties": {"a": {"enum": [1]}}}) == set()
