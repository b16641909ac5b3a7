"""PromptInfo over gRPC: the prompt's logprobs (with their token text) and its decoded text, from a real worker."""

import math

from protos.sfllm.v1 import worker_pb2 as pb
from sfllm_core.sampling_params import SamplingParams
from worker.client import build_request

PROMPT = "The capital of France is Paris, and"


def _prompt_infos(client, request: pb.GenerateRequest) -> list[pb.PromptInfo]:
    responses = list(client.stream(request=request))
    n = max(r.index for r in responses) + 1
    for index in range(n):
        mine = [r for r in responses if r.index == index]
        assert [r.HasField("prompt") for r in mine] == [True] + [False] * (len(mine) - 1)
        assert mine[-1].HasField("finished")
    return [r.prompt for r in responses if r.HasField("prompt")]


def test_prompt_logprobs_cover_every_prompt_token_with_text(client, reference_engine):
    tokenizer = reference_engine.tokenizer
    prompt_ids = reference_engine.encode(PROMPT)
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3)
    expected = reference_engine.generate([prompt_ids], params)[0].prompt_logprobs

    def text(token_id: int) -> str:
        return tokenizer.decode([token_id], skip_special_tokens=False)

    request = build_request(PROMPT, max_tokens=4, temperature=0, ignore_eos=True, n=2)
    request.prompt_logprobs = 3
    for _ in range(2):  # the second time the prompt's pages are cached: the logprobs are still all there
        infos = _prompt_infos(client, request)
        assert len(infos) == 2
        for info in infos:
            entries = info.prompt_logprobs
            assert info.num_prompt_tokens == len(entries) == len(prompt_ids)
            assert [e.token_id for e in entries] == prompt_ids
            first, rest = entries[0], entries[1:]
            assert math.isnan(first.logprob) and not first.top_logprobs and first.token == text(prompt_ids[0])
            assert info.prompt_text == ""
            for got, want in zip(rest, expected, strict=True):
                assert abs(got.logprob - want.logprob) < 1e-4
                assert got.token == text(got.token_id)
                assert [t.token_id for t in got.top_logprobs] == [t for t, _ in want.top]
                for top, (_, value) in zip(got.top_logprobs, want.top):
                    assert abs(top.logprob - value) < 1e-4 and top.token == text(top.token_id)


def test_without_prompt_logprobs_prompt_info_has_none(client):
    infos = _prompt_infos(client, build_request(PROMPT, max_tokens=2))
    assert len(infos) == 1 and not infos[0].prompt_logprobs and infos[0].prompt_text == ""


def test_return_prompt_text_is_the_decode_of_the_prompt_ids_special_tokens_kept(client, reference_engine):
    tokenizer = reference_engine.tokenizer
    body = tokenizer.encode(PROMPT, add_special_tokens=False)
    ids = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id, *body]
    request = build_request(token_ids=ids, max_tokens=2, ignore_eos=True)
    request.return_prompt_text = True
    (info,) = _prompt_infos(client, request)
    assert info.prompt_text == tokenizer.decode(ids, skip_special_tokens=False)
    assert info.prompt_text.startswith("<bos>") and "<eos>" in info.prompt_text
    assert not info.prompt_logprobs

    text_request = build_request(PROMPT, max_tokens=2)
    text_request.return_prompt_text = True
    (info,) = _prompt_infos(client, text_request)
    assert info.prompt_text == tokenizer.decode(reference_engine.encode(PROMPT), skip_special_tokens=False)
