"""InferenceEngine end to end on tiny real checkpoints: batching, chunking, preemption, accounting, errors."""

import asyncio
import time

import pytest
import torch

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.errors import ContextLengthError, InvalidRequestError, QueueFullError
from sfllm_core.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _assert_clean(engine: InferenceEngine) -> None:
    assert engine.pool.num_used_pages == 0, "pages leaked"
    assert engine.pool.num_used_window_pages == 0, "window pages leaked"
    assert not engine.scheduler.running and not engine.scheduler.waiting, "sequences left in a queue"
    assert not engine._seqs and not engine._inbox


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def model_path(request, qwen3_path, gemma3_path):
    return str(qwen3_path if request.param == "qwen3" else gemma3_path)


@pytest.mark.parametrize(
    "setting",
    [
        dict(),  # plain continuous batching
        dict(max_num_batched_tokens=3),  # chunked prefill forced
        dict(num_pages=24, page_size=4),  # preemption forced: 8 sequences need ~70 pages
    ],
    ids=["batched", "chunked-prefill", "preemption"],
)
def test_greedy_tokens_do_not_depend_on_batching(model_path, setting):
    alone = InferenceEngine(model_path=model_path, dtype="float32")
    prompts = _prompts(alone.vocab_size, [19, 5, 33, 12, 1, 27, 8, 40])
    expected = [alone.generate([p], GREEDY)[0].token_ids for p in prompts]

    engine = InferenceEngine(model_path=model_path, dtype="float32", **setting)
    got = [o.token_ids for o in engine.generate(prompts, GREEDY)]
    assert got == expected
    if "num_pages" in setting:
        assert engine.scheduler.num_preemptions > 0
    _assert_clean(engine)


def test_finish_reasons_and_stop_tokens(qwen3_path):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32")
    prompt = _prompts(engine.vocab_size, [9])[0]
    free_run = engine.generate([prompt], GREEDY)[0]
    assert free_run.finish_reason == "length" and len(free_run.token_ids) == 10
    stop_at = free_run.token_ids[4]
    first = free_run.token_ids.index(stop_at)
    stopped = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[stop_at]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free_run.token_ids[:first]
    _assert_clean(engine)


def test_abort_mid_prefill_and_mid_decode_frees_everything(qwen3_path):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32", max_num_batched_tokens=4, page_size=4)
    long_prompt, short_prompt = _prompts(engine.vocab_size, [30, 6])
    engine.add_request("decoding", short_prompt, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.add_request("prefilling", long_prompt, GREEDY)
    outputs = []
    for _ in range(4):
        outputs += engine.step()
    prefilling = engine._seqs["prefilling"]
    decoding = engine._seqs["decoding"]
    assert 0 < prefilling.num_computed_tokens < len(long_prompt)
    assert len(decoding.output_token_ids) > 0
    assert engine.pool.num_used_pages > 0
    engine.abort("prefilling")
    engine.abort("decoding")
    outputs = engine.step()
    assert {(o.request_id, o.finish_reason) for o in outputs} == {("prefilling", "abort"), ("decoding", "abort")}
    _assert_clean(engine)


def test_exception_inside_a_batch_ends_that_batch_only(qwen3_path, monkeypatch):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32")
    prompts = _prompts(engine.vocab_size, [7, 11])
    engine.add_request("a", prompts[0], GREEDY)
    engine.add_request("b", prompts[1], GREEDY)
    real_forward = engine.model.forward

    def failing_forward(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(engine.model, "forward", failing_forward)
    outputs = engine.step()
    assert sorted((o.request_id, o.finish_reason) for o in outputs) == [("a", "error"), ("b", "error")]
    assert all("injected fault" in o.error for o in outputs)
    _assert_clean(engine)
    monkeypatch.setattr(engine.model, "forward", real_forward)
    assert len(engine.generate([prompts[0]], GREEDY)[0].token_ids) == 10
    _assert_clean(engine)


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ([], GREEDY, "prompt"),
        ([1] * 2000, GREEDY, "prompt"),
        ([5, 6], SamplingParams(max_tokens=0), "max_tokens"),
        ([5, 6], SamplingParams(temperature=-0.5), "temperature"),
        ([5, 6], SamplingParams(top_p=0.0), "top_p"),
        ([5, 6], SamplingParams(top_p=1.5), "top_p"),
        ([5, 6], SamplingParams(top_k=-2), "top_k"),
        ([5, 10**9], GREEDY, "prompt"),
        ([5, -1], GREEDY, "prompt"),
        ([5, 6], SamplingParams(stop_token_ids=[10**9]), "stop_token_ids"),
        ([5, 6], SamplingParams(min_p=2.0), "min_p"),
    ],
)
def test_bad_input_raises_one_error_type_and_engine_keeps_serving(qwen3_path, prompt, params, field):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32", max_context_length=512)
    engine.add_request("good", [5, 6, 7], GREEDY)
    engine.step()
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request("bad", prompt, params)
    assert info.value.param == field
    assert str(info.value)
    while engine.has_work():
        engine.step()
    _assert_clean(engine)


def test_context_length_error_names_the_limit(qwen3_path):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32", max_context_length=64)
    with pytest.raises(ContextLengthError, match="maximum context length is 64 tokens"):
        engine.add_request("x", [5] * 64, GREEDY)
    with pytest.raises(ContextLengthError, match="maximum context length is 64 tokens"):
        engine.add_request("y", [5] * 60, SamplingParams(max_tokens=10))


def test_queue_bound(qwen3_path):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32", max_waiting=2)
    engine.add_request("a", [5, 6], GREEDY)
    engine.add_request("b", [5, 6], GREEDY)
    with pytest.raises(QueueFullError):
        engine.add_request("c", [5, 6], GREEDY)


def test_prefix_cache_reuses_pages_and_keeps_outputs(qwen3_path):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32", page_size=4)
    shared = _prompts(engine.vocab_size, [24])[0]
    first = engine.generate([shared + [7, 8]], GREEDY)[0]
    engine.add_request("second", shared + [7, 8], GREEDY)
    seq = engine._seqs.get("second") or engine._inbox[-1][1]
    while engine.has_work():
        engine.step()
    assert seq.num_cached_tokens == 24
    assert seq.output_token_ids == first.token_ids
    assert engine.get_load().prefix_cache_hit_rate > 0
    _assert_clean(engine)


def test_text_prompts_and_detokenized_output(qwen3_path):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32")
    out = engine.generate(["Hello there, how are"], GREEDY)[0]
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert out.prompt_token_ids == engine.encode("Hello there, how are")


def test_stream_yields_tokens_and_cancel_frees_pages(qwen3_path):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32")
    prompt = _prompts(engine.vocab_size, [9])[0]
    expected = engine.generate([prompt], GREEDY)[0].token_ids

    async def main():
        tokens = []
        async for out in engine.stream(prompt, GREEDY):
            tokens += out.token_ids
            last = out
        assert last.finished and last.finish_reason == "length"
        assert tokens == expected

        received = [0] * 4

        async def consume_forever(i):
            async for out in engine.stream(prompt, SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)):
                received[i] += len(out.token_ids)

        async def wait_for(condition, what):
            deadline = time.monotonic() + 60
            while not condition():
                assert time.monotonic() < deadline, f"timed out waiting for {what}: {engine.get_load()}"
                await asyncio.sleep(0.01)

        tasks = [asyncio.create_task(consume_forever(i)) for i in range(4)]
        # All four decoding (each has had a token) before the cancel, so the cancel must free real pages.
        await wait_for(lambda: min(received) > 0 and engine.get_load().num_running == 4, "four running streams")
        assert engine.get_load().kv_pages_used > 0
        streamed = list(engine._seqs.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wait_for(lambda: engine.get_load().kv_pages_used == 0 and not engine.has_work(), "the pages to be freed")
        # Freed by the cancel, not by running to max_tokens.
        assert [seq.finish_reason for seq in streamed] == ["abort"] * 4
        with pytest.raises(InvalidRequestError):
            async for _ in engine.stream([], GREEDY):
                pass

    try:
        asyncio.run(main())
        _assert_clean(engine)
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "setting",
    [dict(), dict(max_num_batched_tokens=3), dict(num_pages=24)],
    ids=["batched", "chunked-prefill", "preemption"],
)
def test_sliding_window_layers_keeping_only_the_window_change_no_token(gemma3_path, setting):
    """Gemma3's local layers (window 8) in their own pool, pages released a window behind, vs whole-context KV."""
    whole = InferenceEngine(model_path=str(gemma3_path), dtype="float32", page_size=4, sliding_window_kv=False)
    assert whole.pool.window is None
    engine = InferenceEngine(model_path=str(gemma3_path), dtype="float32", page_size=4, **setting)
    assert engine.pool.window == 8 and engine.pool.num_window_pages > 0
    prompts = _prompts(engine.vocab_size, [19, 5, 33, 12, 1, 27, 8, 40])
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in whole.generate(prompts, params)]
    assert [o.token_ids for o in engine.generate(prompts, params)] == expected
    if "num_pages" in setting:
        assert engine.scheduler.num_preemptions > 0
    _assert_clean(engine)


def test_sliding_window_pages_are_released_a_window_behind(gemma3_path):
    engine = InferenceEngine(model_path=str(gemma3_path), dtype="float32", page_size=4)
    engine.add_request("long", _prompts(engine.vocab_size, [40])[0], SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    seq = engine._seqs["long"]
    while seq.num_computed_tokens < 50:
        engine.step()
    # 50+ tokens in 13+ pages; the next query reads keys from position 43 on: pages 10 and later.
    assert seq.window_start == (seq.num_computed_tokens - 8 + 1) // 4
    assert engine.pool.num_used_window_pages == len(seq.pages) - seq.window_start < engine.pool.num_used_pages
    assert seq.window_pages == engine.pool.window_page_row(seq.pages, seq.window_start)
    while engine.has_work():
        engine.step()
    _assert_clean(engine)


def test_prefix_cache_shares_window_pages_too(gemma3_path):
    engine = InferenceEngine(model_path=str(gemma3_path), dtype="float32", page_size=4)
    shared = _prompts(engine.vocab_size, [24])[0]
    first = engine.generate([shared + [7, 8]], GREEDY)[0]
    engine.add_request("second", shared + [7, 8], GREEDY)
    seq = engine._seqs.get("second") or engine._inbox[-1][1]
    while engine.has_work():
        engine.step()
    assert seq.num_cached_tokens == 24  # the companions of the last window of cached pages survived
    assert seq.output_token_ids == first.token_ids
    _assert_clean(engine)


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=5)], ids=["greedy", "seeded"])
def test_a_continuation_goes_on_as_the_uninterrupted_sequence(model_path, sampling):
    """Output generated elsewhere, given as a continuation, is prefilled with the prompt and counts as output."""
    engine = InferenceEngine(model_path=model_path, dtype="float32", max_num_batched_tokens=8)  # chunked
    params = SamplingParams(max_tokens=24, ignore_eos=True, **sampling)
    prompt = _prompts(engine.vocab_size, [13])[0]
    whole = engine.generate([prompt], params)[0].token_ids
    for cut in (1, 11, 23):
        seq = engine.make_sequence(f"cont-{cut}", prompt, params, whole[:cut])
        engine.submit(seq)
        while not seq.is_finished:
            engine.step()
        assert (seq.output_token_ids, seq.finish_reason) == (whole, "length"), f"cut {cut}"
    with pytest.raises(InvalidRequestError) as info:
        engine.make_sequence("full", prompt, params, whole)  # nothing left to generate
    assert info.value.param == "continuation"
    _assert_clean(engine)


def test_preemption_never_leaves_the_queue_waiting_on_a_prefix_its_second_holds(qwen3_path):
    """The queue's head takes its cached prefix pages while it waits; a preempted sequence put
    before it must not then wait for ever on the pages it holds (a livelock once seen here)."""
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32", page_size=4, num_pages=20)
    prompts = _prompts(engine.vocab_size, [19, 5, 33])
    prompts += [prompts[0][:6] * 4, prompts[2][:9] * 3]
    seqs = [
        engine.make_sequence(f"r{i}", p, SamplingParams(max_tokens=24, ignore_eos=True)) for i, p in enumerate(prompts)
    ]
    for seq in seqs:
        engine.submit(seq)
    for _ in range(400):
        if not engine.has_work():
            break
        engine.step()
    assert [s.finish_reason for s in seqs] == ["length"] * 5
    assert engine.scheduler.num_preemptions > 0
    _assert_clean(engine)
