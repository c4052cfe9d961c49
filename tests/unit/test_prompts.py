import pytest

from vllm_obtain.api.param_names import param_name as param_from_location
from vllm_obtain.core.planning import ParamError, check_token_ids, plan_max_tokens


def test_unset_max_tokens_takes_all_remaining_context():
    assert plan_max_tokens(100, None, 1024, prompt_param="messages") == 924


def test_requested_max_tokens_is_kept_when_it_fits():
    assert plan_max_tokens(100, 50, 1024, prompt_param="messages") == 50


def test_prompt_longer_than_context_is_refused_with_context_length_code():
    with pytest.raises(ParamError) as err:
        plan_max_tokens(2000, None, 1024, prompt_param="messages")
    assert err.value.code == "context_length_exceeded"
    assert err.value.param == "messages"
    assert "1024" in str(err.value)


def test_completion_that_cannot_fit_names_max_tokens():
    with pytest.raises(ParamError) as err:
        plan_max_tokens(1000, 100, 1024, prompt_param="prompt")
    assert err.value.param == "max_tokens"


def test_empty_prompt_is_refused():
    with pytest.raises(ParamError):
        plan_max_tokens(0, None, 1024, prompt_param="prompt")


def test_out_of_range_token_ids_are_refused():
    check_token_ids([0, 5, 9], 10, prompt_param="prompt")
    for bad in ([10], [-1]):
        with pytest.raises(ParamError, match="out of range"):
            check_token_ids(bad, 10, prompt_param="prompt")


def test_param_names_are_spelled_as_openai_does():
    assert param_from_location(("body", "messages", 0, "content")) == "messages.[0].content"
    assert param_from_location(("body", "temperature")) == "temperature"
    assert param_from_location(("body",)) is None
