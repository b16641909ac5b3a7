"""Generate, Abort, GetModelInfo and GetLoad against a real worker on loopback with a tiny model."""

import asyncio
import logging
import math
import time

import grpc
import pytest

from protos.sfllm.v1 import worker_pb2 as pb
from sfllm_core.sampling_params import SamplingParams
from worker.client import AsyncWorkerClient, WorkerClient, build_request

PROMPT = "hello world, this is"


def _wait_for_clean_load(client: WorkerClient, timeout: float = 10.0) -> pb.GetLoadResponse:
    deadline = time.monotonic() + timeout
    while True:
        load = client.load()
        if (load.num_requests_running, load.num_requests_waiting, load.kv_pages_used) == (0, 0, 0):
            return load
        assert time.monotonic() < deadline, f"engine did not go idle: {load}"
        time.sleep(0.02)


def test_stream_shape_deltas_then_finished_the_first_carrying_the_prompt(client):
    responses = list(client.stream(PROMPT, max_tokens=8, temperature=0, ignore_eos=True, request_id="shape"))
    events = [r.WhichOneof("event") for r in responses]
    assert events[-1] == "finished" and set(events[:-1]) == {"delta"}
    assert [r.HasField("prompt") for r in responses] == [True] + [False] * (len(responses) - 1)
    assert all(r.request_id == "shape" and r.index == 0 for r in responses)
    finished = responses[-1].finished
    assert finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert finished.usage.completion_tokens == 8
    assert finished.usage.prompt_tokens == responses[0].prompt.num_prompt_tokens > 0


@pytest.mark.parametrize(
    "sampling",
    [dict(temperature=0.0), dict(temperature=1.0, seed=7), dict(temperature=0.8, top_k=20, top_p=0.9, seed=3)],
    ids=["greedy", "seeded", "seeded-topk-topp"],
)
def test_streamed_tokens_are_exactly_the_engines(client, reference_engine, sampling):
    prompt_ids = reference_engine.encode(PROMPT)
    params = SamplingParams(max_tokens=24, ignore_eos=True, **sampling)
    expected = reference_engine.generate([prompt_ids], params)[0].token_ids
    got = client.generate(PROMPT, max_tokens=24, ignore_eos=True, **sampling)
    assert got.token_ids == expected
    assert got.num_prompt_tokens == len(prompt_ids)
    via_ids = client.generate(token_ids=prompt_ids, max_tokens=24, ignore_eos=True, **sampling)
    assert via_ids.token_ids == expected


def test_text_deltas_concatenate_to_the_full_decode(client, reference_engine):
    # Random tiny-model output is full of byte tokens: multi-byte characters get split across tokens.
    tokenizer = reference_engine.tokenizer
    for seed in range(3):
        result = client.generate(PROMPT, max_tokens=48, temperature=1.0, seed=seed, n=4, ignore_eos=True)
        for choice in result.choices:
            assert choice.text == tokenizer.decode(choice.token_ids, skip_special_tokens=True)
    with_special = client.generate(PROMPT, max_tokens=48, temperature=1.0, seed=9, skip_special_tokens=False)
    assert with_special.text == tokenizer.decode(with_special.token_ids, skip_special_tokens=False)


def _clean_boundary(tokenizer, token_ids: list[int]) -> int:
    """An index k where tokens k and k+1 both decode alone to plain printable text."""
    for k in range(2, len(token_ids) - 1):
        a, b = tokenizer.decode([token_ids[k]]), tokenizer.decode([token_ids[k + 1]])
        if a and b and a.isprintable() and b.isprintable() and a.isascii() and b.isascii():
            return k
    raise AssertionError("no clean token boundary in the free run")


@pytest.mark.parametrize("span", [(1, 1), (2, 3), (1, 0)], ids=["across-boundary", "wide", "inside-one-token"])
def test_stop_strings_cut_across_token_boundaries(client, reference_engine, span):
    tokenizer = reference_engine.tokenizer
    free = client.generate(PROMPT, max_tokens=40, temperature=1.0, seed=11, ignore_eos=True)
    k = _clean_boundary(tokenizer, free.token_ids)
    before = tokenizer.decode(free.token_ids[: k + 1])
    after = tokenizer.decode(free.token_ids[: k + 2])[len(before) :]
    stop = before[-span[0] :] + after[: span[1]]
    cut = free.text.find(stop)
    assert cut >= 0

    stopped = client.generate(PROMPT, max_tokens=40, temperature=1.0, seed=11, ignore_eos=True, stop=[stop, "\x00\x00"])
    assert stopped.text == free.text[:cut]
    assert stopped.finish_reason == "stop" and stopped.choices[0].stop == stop
    assert stopped.token_ids == free.token_ids[: len(stopped.token_ids)]
    assert stop in tokenizer.decode(stopped.token_ids)  # the tokens run up to the one that completed the stop
    assert stopped.choices[0].usage.completion_tokens == len(stopped.token_ids)


def test_stop_token_ids_end_the_stream_and_count_in_usage(client):
    free = client.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True)
    stop_token = free.token_ids[5]
    stopped = client.generate(PROMPT, max_tokens=16, temperature=0, ignore_eos=True, stop_token_ids=[stop_token])
    first = free.token_ids.index(stop_token)
    assert stopped.token_ids == free.token_ids[:first]
    assert stopped.finish_reason == "stop" and stopped.choices[0].stop == stop_token
    assert stopped.choices[0].usage.completion_tokens == first + 1


def test_chat_input_uses_the_chat_template(client, reference_engine):
    messages = [{"role": "user", "content": "hello <|im_end|> world"}]
    expected_prompt = reference_engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False, sanitize_control_tokens=True
    )
    result = client.generate(messages=messages, max_tokens=4, temperature=0, ignore_eos=True)
    assert result.num_prompt_tokens == len(expected_prompt)
    # The special token typed by the user stays text: the prompt holds exactly the template's own markers.
    end_id = reference_engine.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert expected_prompt.count(end_id) == reference_engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=True, return_dict=False
    ).count(end_id)
    assert client.model_info().has_chat_template


def test_n_completions_are_indexed_and_seeded_in_sequence(client):
    many = client.generate(PROMPT, max_tokens=12, temperature=1.0, seed=100, n=3, ignore_eos=True)
    assert [c.index for c in many.choices] == [0, 1, 2]
    for i, choice in enumerate(many.choices):
        alone = client.generate(PROMPT, max_tokens=12, temperature=1.0, seed=100 + i, ignore_eos=True)
        assert choice.token_ids == alone.token_ids
        assert choice.finish_reason == "length"


def test_logprobs_come_with_each_token(client):
    result = client.generate(PROMPT, max_tokens=6, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)
    lps = result.choices[0].logprobs
    assert [lp.token_id for lp in lps] == result.token_ids
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].token_id == lp.token_id  # greedy picks the most likely token
        assert math.isclose(lp.top_logprobs[0].logprob, lp.logprob, rel_tol=1e-5, abs_tol=1e-6)


def test_unset_max_tokens_fills_the_context(client):
    info = client.model_info()
    result = client.generate(token_ids=[5] * (info.max_context_length - 3), temperature=0, ignore_eos=True)
    assert len(result.token_ids) == 3 and result.finish_reason == "length"


async def _run_and_maybe_cancel(target: str, i: int, cancel: bool) -> tuple[int, str | None]:
    async with AsyncWorkerClient(target, timeout=60) as client:
        tokens, reason = 0, None
        async for response in client.stream(
            f"{PROMPT} {i}", max_tokens=400 if cancel else 32, temperature=1.0, seed=i, ignore_eos=True
        ):
            if response.HasField("delta"):
                tokens += len(response.delta.token_ids)
                if cancel and tokens >= 3:
                    break  # leaving the loop cancels the call
            if response.HasField("finished"):
                reason = pb.FinishReason.Name(response.finished.finish_reason)
        return tokens, reason


def test_32_concurrent_streams_and_16_cancelled_free_every_page(worker, client):
    _wait_for_clean_load(client)

    async def run() -> list[tuple[int, str | None]]:
        return await asyncio.gather(*(_run_and_maybe_cancel(worker.target, i, cancel=i % 2 == 1) for i in range(32)))

    results = asyncio.run(run())
    for i, (tokens, reason) in enumerate(results):
        if i % 2 == 0:
            assert (tokens, reason) == (32, "FINISH_REASON_LENGTH")
        else:
            assert reason is None and tokens >= 3
    load = _wait_for_clean_load(client)
    assert load.kv_pages_total > 0


def test_abort_ends_the_stream_with_abort(client):
    stream = client.stream(PROMPT, max_tokens=400, temperature=0, ignore_eos=True, request_id="to-abort")
    assert next(stream).HasField("prompt")
    assert client.abort(["to-abort", "unknown-id"]) == ["to-abort"]
    rest = list(stream)
    assert rest[-1].finished.finish_reason == pb.FINISH_REASON_ABORT
    assert sum(len(r.delta.token_ids) for r in rest if r.HasField("delta")) < 400
    _wait_for_clean_load(client)


INVALID = [
    ("input", pb.GenerateRequest()),
    ("token_ids", build_request(token_ids=[])),
    ("token_ids", build_request(token_ids=[10**6])),
    ("token_ids", build_request(token_ids=[-1])),
    ("chat.messages", build_request(messages=[])),
    ("role", build_request(messages=[{"role": "", "content": "hi"}])),
    ("max_tokens", build_request(PROMPT, max_tokens=0)),
    ("max_tokens", build_request(PROMPT, max_tokens=-5)),
    ("temperature", build_request(PROMPT, temperature=-1)),
    ("temperature", build_request(PROMPT, temperature=math.nan)),
    ("top_p", build_request(PROMPT, top_p=0)),
    ("top_p", build_request(PROMPT, top_p=1.5)),
    ("top_k", build_request(PROMPT, top_k=-2)),
    ("min_p", build_request(PROMPT, min_p=2)),
    ("repetition_penalty", build_request(PROMPT, repetition_penalty=0)),
    ("presence_penalty", build_request(PROMPT, presence_penalty=3)),
    ("frequency_penalty", build_request(PROMPT, frequency_penalty=-3)),
    ("seed", build_request(PROMPT, seed=-1)),
    ("seed", build_request(PROMPT, seed=2**63 - 1, n=2)),
    ("stop", build_request(PROMPT, stop=[""])),
    ("stop", build_request(PROMPT, stop=["s"] * 17)),
    ("stop_token_ids", build_request(PROMPT, stop_token_ids=[10**6])),
    ("top_logprobs", build_request(PROMPT, logprobs=True, top_logprobs=21)),
    ("top_logprobs", build_request(PROMPT, top_logprobs=2)),
    ("n", build_request(PROMPT, n=0)),
    ("n", build_request(PROMPT, n=17)),
    ("request_id", build_request(PROMPT, request_id="x" * 300)),
]


@pytest.fixture(scope="module")
def short_greedy(reference_engine) -> list[int]:
    """The engine's 4 greedy tokens for PROMPT (eos ignored): what a worker that still serves answers."""
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    return reference_engine.generate([reference_engine.encode(PROMPT)], params)[0].token_ids


@pytest.mark.parametrize("field,request_", INVALID, ids=[f"{f}-{i}" for i, (f, _) in enumerate(INVALID)])
def test_invalid_fields_are_invalid_argument_naming_the_field(client, short_greedy, field, request_, caplog):
    caplog.set_level(logging.INFO, logger="sfllm.worker")
    with pytest.raises(grpc.RpcError) as info:
        client.generate(request=request_)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.details()
    param = dict(error.trailing_metadata()).get("sfllm-error-param", "")
    assert field.split(".")[-1] in param
    # ... and the worker keeps serving: a whole completion, token for token the engine's.
    after = client.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True)
    assert (after.finish_reason, after.token_ids) == ("length", short_greedy)


def test_prompt_over_the_context_names_the_maximum_context_length(client):
    n = client.model_info().max_context_length
    for request in (
        build_request(token_ids=[5] * n),
        build_request(token_ids=[5] * (n + 10)),
        build_request(token_ids=[5] * (n - 4), max_tokens=10),
    ):
        with pytest.raises(grpc.RpcError) as info:
            client.generate(request=request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert f"maximum context length is {n} tokens" in info.value.details()


def test_duplicate_in_flight_request_id_is_refused(client):
    stream = client.stream(PROMPT, max_tokens=400, temperature=0, ignore_eos=True, request_id="dup")
    next(stream)
    with pytest.raises(grpc.RpcError) as info:
        client.generate(PROMPT, max_tokens=2, request_id="dup")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id" in info.value.details()
    stream.close()  # cancels, which aborts
    _wait_for_clean_load(client)


def test_model_info_and_load(client, reference_engine):
    info = client.model_info()
    assert info.served_model_name == reference_engine.model_name
    assert info.max_context_length == reference_engine.max_context_length
    assert info.vocab_size == reference_engine.vocab_size
    assert list(info.eos_token_ids) == sorted(reference_engine.eos_token_ids)
    assert info.model_type == "qwen3"
    load = client.load()
    assert load.kv_pages_total == reference_engine.pool.num_pages
    assert load.HasField("prefix_cache_hit_rate")


def test_one_log_line_per_request_without_the_prompt(client, caplog):
    caplog.set_level(logging.INFO, logger="sfllm.worker")
    secret = "zebra-secret-prompt"
    client.generate(secret, max_tokens=3, temperature=0, ignore_eos=True, request_id="logged")
    lines = [r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "logged"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    fields = lines[0].fields
    assert fields["completion_tokens"] == 3 and fields["finish_reason"] == "length" and fields["prompt_tokens"] > 0
    assert fields["latency_s"] >= 0 and fields["status"] == "OK"
    assert all(secret not in r.getMessage() and secret not in str(getattr(r, "fields", "")) for r in caplog.records)
