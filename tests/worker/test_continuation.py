"""Generate with a continuation: a completion begun elsewhere goes on exactly as if it had never moved.

A router that loses a worker mid-stream re-sends the prompt as token ids (PromptInfo returns them)
and, as `continuation`, the tokens the client was shown; the new worker's text, tokens, finish and
usage must continue the uninterrupted completion's.
"""

import re

import grpc
import pytest

from protos.sfllm.v1 import worker_pb2 as pb
from worker.client import Completion, build_request
from worker.detokenizer import IncrementalDetokenizer
from worker.stop_strings import StopStringMatcher

PROMPT = "hello world, this is"
MAX_TOKENS = 24


def sent_text(tokenizer, token_ids: list[int], stops: list[str] = ()) -> str:
    """The text a worker has streamed once these output tokens went through its detokenizer and stop strings."""
    detok, stop = IncrementalDetokenizer(tokenizer), StopStringMatcher(stops)
    return "".join(stop.push(detok.push(t)) for t in token_ids)


def prompt_ids(client, **kwargs: object) -> list[int]:
    """The token ids the worker made of a prompt (return_prompt_token_ids)."""
    request = build_request(max_tokens=1, **kwargs)  # type: ignore[arg-type]
    request.return_prompt_token_ids = True
    first = next(iter(client.stream(request=request)))
    assert len(first.prompt.prompt_token_ids) == first.prompt.num_prompt_tokens
    return list(first.prompt.prompt_token_ids)


def check_continues(
    client, tokenizer, ids: list[int], cuts: list[int], stops: list[str] = (), **sampling
) -> Completion:
    """The uninterrupted completion, and each continuation from one of its cuts, agree in every respect."""
    whole = client.generate(token_ids=ids, stop=list(stops), **sampling)
    assert len(whole.token_ids) > max(cuts), whole
    for cut in cuts:
        rest = client.generate(token_ids=ids, continuation=whole.token_ids[:cut], stop=list(stops), **sampling)
        (a, b) = whole.choices[0], rest.choices[0]
        assert b.token_ids == a.token_ids[cut:], f"cut {cut}"
        assert sent_text(tokenizer, a.token_ids[:cut], stops) + b.text == a.text, f"cut {cut}"
        assert (b.finish_reason, b.stop) == (a.finish_reason, a.stop), f"cut {cut}"
        assert (b.usage.prompt_tokens, b.usage.completion_tokens) == (a.usage.prompt_tokens, a.usage.completion_tokens)
    return whole


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=11)], ids=["greedy", "seeded"])
def test_a_continuation_goes_on_as_the_uninterrupted_completion(client, reference_engine, sampling):
    ids = prompt_ids(client, prompt=PROMPT)
    assert ids == reference_engine.encode(PROMPT)
    check_continues(client, reference_engine.tokenizer, ids, [1, 9, MAX_TOKENS - 1], max_tokens=MAX_TOKENS,
                    ignore_eos=True, **sampling)  # fmt: skip


def test_the_continuation_counts_toward_max_tokens_and_penalties(client, reference_engine):
    ids = reference_engine.encode(PROMPT)
    sampling = dict(max_tokens=20, temperature=1.0, seed=4, ignore_eos=True)
    whole = check_continues(client, reference_engine.tokenizer, ids, [6, 15], frequency_penalty=2.0,
                            presence_penalty=1.0, repetition_penalty=1.5, **sampling)  # fmt: skip
    assert whole.finish_reason == "length" and len(whole.token_ids) == 20


def test_a_stop_string_begun_in_the_continuation_still_stops(client, reference_engine):
    tokenizer = reference_engine.tokenizer
    ids = reference_engine.encode(PROMPT)
    free = client.generate(token_ids=ids, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    # A stop string of this output's text spanning four of its tokens, from the end of token `start`.
    ends = [len(tokenizer.decode(free.token_ids[: k + 1])) for k in range(len(free.token_ids))]
    start = next(k for k in range(4, len(ends) - 4) if ends[k + 3] - ends[k] >= 6 and ends[k] > ends[k - 1] + 1)
    stop = tokenizer.decode(free.token_ids)[ends[start] - 2 : ends[start + 3] - 1]
    assert len(sent_text(tokenizer, free.token_ids[: start + 1], [stop])) == ends[start] - 2  # its start held back
    # Cuts before the stop string, inside it (its start held back, and half of it) and at it.
    whole = check_continues(client, tokenizer, ids, [start - 2, start + 1, start + 2], [stop],
                            max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)  # fmt: skip
    assert whole.finish_reason == "stop" and whole.choices[0].stop == stop


def test_a_chat_prompt_continues_from_its_token_ids(client, reference_engine):
    messages = [{"role": "user", "content": "Say something."}]
    ids = prompt_ids(client, messages=messages)
    chat = client.generate(messages=messages, max_tokens=16, temperature=0.0, ignore_eos=True)
    rest = client.generate(token_ids=ids, continuation=chat.token_ids[:5], max_tokens=16, temperature=0.0,
                           ignore_eos=True)  # fmt: skip
    assert chat.token_ids[5:] == rest.token_ids
    assert sent_text(reference_engine.tokenizer, chat.token_ids[:5]) + rest.text == chat.text


def test_a_constrained_continuation_keeps_to_its_grammar(client, reference_engine):
    ids = reference_engine.encode(PROMPT)
    constraint = pb.Constraint(regex="[a-z]{3}( [a-z]{3}){5}")
    whole = check_continues(client, reference_engine.tokenizer, ids, [3, 8], max_tokens=40, temperature=1.0,
                            seed=2, constraint=constraint)  # fmt: skip
    assert whole.finish_reason == "stop" and re.fullmatch("[a-z]{3}( [a-z]{3}){5}", whole.text)
    # A token the grammar cannot start with: it refuses the continuation, and the completion fails.
    bad = client.generate(token_ids=ids, continuation=reference_engine.encode("{")[-1:], max_tokens=8,
                          constraint=constraint)  # fmt: skip
    assert bad.finish_reason == "error" and "continuation" in bad.choices[0].error


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=PROMPT, continuation=[5]), "token_ids"),
        (dict(token_ids=[3, 4, 5], continuation=[5], n=2), "n == 1"),
        (dict(token_ids=[3, 4, 5], continuation=[5, 6], max_tokens=2), "max_tokens"),
        (dict(token_ids=[3, 4, 5], continuation=[10**6]), "vocabulary"),
    ],
    ids=["text-input", "n-2", "no-room", "out-of-vocabulary"],
)
def test_a_continuation_the_worker_cannot_continue_is_refused_naming_it(client, kwargs, message):
    with pytest.raises(grpc.RpcError) as info:
        client.generate(**kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert dict(info.value.trailing_metadata())["sfllm-error-param"] == "continuation"
