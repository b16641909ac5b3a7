"""SGLang's native API (/generate, /get_model_info, /get_server_info, /health_generate) on a real gateway.

Most tests use the shared gateway over two tiny-Qwen3 workers; those marked with `stack` also run
against a gateway over one tiny-Gemma3 worker.
"""

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_harness import API_KEY, GatewayServer, WorkerProcess, worker_behind_gateway

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The quick brown fox"
OTHER = "Café, naïve, résumé: les accents"
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def gemma_gateway(gemma3_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    with worker_behind_gateway(Path(gemma3_path), tmp_path_factory.mktemp("gemma-logs"), "gemma") as (_, server):
        yield server


@pytest.fixture(params=["qwen3", "gemma3"])
def stack(request: pytest.FixtureRequest) -> GatewayServer:
    """A gateway over the tiny Qwen3 workers, then one over a tiny Gemma3 worker."""
    return request.getfixturevalue("gateway" if request.param == "qwen3" else "gemma_gateway")


def generate(gateway: GatewayServer, body: dict[str, Any], status: int = 200) -> Any:
    response = httpx.post(gateway.url + "/generate", json=body, headers=HEADERS, timeout=60)
    assert response.status_code == status, response.text
    return response.json()


def stream(gateway: GatewayServer, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chunks of a streamed /generate, checked to be SSE data events ending with [DONE]."""
    with httpx.stream(
        "POST", gateway.url + "/generate", json={**body, "stream": True}, headers=HEADERS, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events[:-1])
    return [json.loads(e[len("data: ") :]) for e in events[:-2]]


def completion(gateway: GatewayServer, prompt: str | list[int], **params: Any) -> dict[str, Any]:
    model = httpx.get(gateway.url + "/get_model_info", headers=HEADERS).json()["served_model_name"]
    body = {"model": model, "prompt": prompt, **params}
    response = httpx.post(gateway.url + "/v1/completions", json=body, headers=HEADERS, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


# ------------------------------------------------------------------------------------------ /generate


def test_a_text_prompt_gets_text_output_ids_and_meta_info(stack: GatewayServer) -> None:
    out = generate(stack, {"text": PROMPT, "sampling_params": GREEDY})
    assert set(out) == {"text", "output_ids", "meta_info"}
    assert isinstance(out["text"], str) and all(isinstance(t, int) for t in out["output_ids"])
    meta = out["meta_info"]
    assert isinstance(meta["id"], str) and meta["id"]
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["completion_tokens"] == len(out["output_ids"]) == 8
    assert meta["prompt_tokens"] > 0 and meta["cached_tokens"] >= 0 and meta["e2e_latency"] > 0
    assert "output_token_logprobs" not in meta


def test_max_new_tokens_defaults_to_sglangs_128(gateway: GatewayServer) -> None:
    out = generate(gateway, {"text": PROMPT, "sampling_params": {"ignore_eos": True}})
    assert out["meta_info"]["completion_tokens"] == 128


@pytest.mark.parametrize("ignore_eos", [True, False])
def test_generate_equals_the_completions_route_at_temperature_zero(stack: GatewayServer, ignore_eos: bool) -> None:
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": ignore_eos}
    native = generate(stack, {"text": PROMPT, "sampling_params": params})
    openai = completion(stack, PROMPT, max_tokens=24, temperature=0, ignore_eos=ignore_eos)
    assert native["text"] == openai["choices"][0]["text"]
    assert native["meta_info"]["finish_reason"]["type"] == openai["choices"][0]["finish_reason"]
    assert native["meta_info"]["prompt_tokens"] == openai["usage"]["prompt_tokens"]
    assert native["meta_info"]["completion_tokens"] == openai["usage"]["completion_tokens"]


def test_a_batch_of_texts_answers_a_list_in_order(stack: GatewayServer) -> None:
    singles = [generate(stack, {"text": t, "sampling_params": GREEDY}) for t in (PROMPT, OTHER)]
    batch = generate(stack, {"text": [PROMPT, OTHER], "sampling_params": GREEDY})
    assert isinstance(batch, list) and len(batch) == 2
    assert [b["text"] for b in batch] == [s["text"] for s in singles]
    assert [b["output_ids"] for b in batch] == [s["output_ids"] for s in singles]
    assert [b["meta_info"]["prompt_tokens"] for b in batch] == [s["meta_info"]["prompt_tokens"] for s in singles]
    assert len({b["meta_info"]["id"] for b in batch}) == 2


def test_token_id_prompts_single_and_batched(stack: GatewayServer) -> None:
    single = generate(stack, {"input_ids": [5, 6, 7, 8], "sampling_params": GREEDY})
    assert single["meta_info"]["prompt_tokens"] == 4
    openai = completion(stack, [5, 6, 7, 8], max_tokens=8, temperature=0, ignore_eos=True)
    assert single["text"] == openai["choices"][0]["text"]
    batch = generate(stack, {"input_ids": [[5, 6, 7, 8], [9, 10]], "sampling_params": GREEDY})
    assert [b["meta_info"]["prompt_tokens"] for b in batch] == [4, 2]
    other = generate(stack, {"input_ids": [9, 10], "sampling_params": GREEDY})
    assert [b["output_ids"] for b in batch] == [single["output_ids"], other["output_ids"]]


def test_n_samples_come_prompt_by_prompt(gateway: GatewayServer) -> None:
    """SGLang's order for n > 1: each prompt's n samples together, prompts in order."""
    greedy = [generate(gateway, {"text": t, "sampling_params": GREEDY})["text"] for t in (PROMPT, OTHER)]
    assert greedy[0] != greedy[1]
    out = generate(gateway, {"text": [PROMPT, OTHER], "sampling_params": {**GREEDY, "n": 2}})
    assert [o["text"] for o in out] == [greedy[0], greedy[0], greedy[1], greedy[1]]

    sampled = {"max_new_tokens": 8, "ignore_eos": True, "temperature": 1.0, "sampling_seed": 7, "n": 2}
    one = generate(gateway, {"text": PROMPT, "rid": "sampled", "sampling_params": sampled})
    assert isinstance(one, list) and [o["meta_info"]["id"] for o in one] == ["sampled_0", "sampled_1"]
    again = generate(gateway, {"text": PROMPT, "sampling_params": sampled})
    assert [o["text"] for o in again] == [o["text"] for o in one]  # same seed, same samples


def test_a_stream_sends_the_output_so_far_then_done(stack: GatewayServer) -> None:
    body = {"text": PROMPT, "sampling_params": {**GREEDY, "max_new_tokens": 16}}
    whole = generate(stack, body)
    chunks = stream(stack, body)
    assert all("index" not in c for c in chunks)
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after["text"].startswith(before["text"])
        assert after["output_ids"][: len(before["output_ids"])] == before["output_ids"]
        assert before["meta_info"]["finish_reason"] is None
    last = chunks[-1]
    assert last["text"] == whole["text"] and last["output_ids"] == whole["output_ids"]
    assert last["meta_info"]["finish_reason"] == whole["meta_info"]["finish_reason"]
    assert last["meta_info"]["completion_tokens"] == 16


def test_a_streamed_batch_tags_each_chunk_with_its_index(gateway: GatewayServer) -> None:
    body = {"text": [PROMPT, OTHER], "sampling_params": {**GREEDY, "n": 2}}
    whole = generate(gateway, body)
    chunks = stream(gateway, body)
    last: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        assert chunk["index"] not in last or last[chunk["index"]]["meta_info"]["finish_reason"] is None
        last[chunk["index"]] = chunk
    assert sorted(last) == [0, 1, 2, 3]
    assert [last[i]["text"] for i in range(4)] == [w["text"] for w in whole]
    assert [last[i]["output_ids"] for i in range(4)] == [w["output_ids"] for w in whole]


def test_return_logprob_gives_sglangs_triples(gateway: GatewayServer) -> None:
    body = {"text": PROMPT, "sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 2}
    out = generate(gateway, {**body, "return_text_in_logprobs": True})
    meta = out["meta_info"]
    assert meta["input_token_logprobs"] == [] and meta["input_top_logprobs"] == []
    triples = meta["output_token_logprobs"]
    assert [t[1] for t in triples] == out["output_ids"]
    assert all(isinstance(lp, float) and lp <= 0 and isinstance(tok, str) for lp, _, tok in triples)
    assert "".join(t[2] for t in triples) == out["text"]
    tops = meta["output_top_logprobs"]
    assert len(tops) == 8 and all(len(top) == 2 for top in tops)
    assert all(top[0][0] >= top[1][0] for top in tops)  # best first

    openai = completion(gateway, PROMPT, max_tokens=8, temperature=0, ignore_eos=True, logprobs=2)
    assert [t[0] for t in triples] == pytest.approx(openai["choices"][0]["logprobs"]["token_logprobs"], abs=1e-6)

    plain = generate(gateway, {**body, "top_logprobs_num": 0})["meta_info"]
    assert all(t[2] is None for t in plain["output_token_logprobs"]) and "output_top_logprobs" not in plain
    streamed = stream(gateway, body)[-1]["meta_info"]
    assert [t[:2] for t in streamed["output_token_logprobs"]] == [t[:2] for t in triples]


def test_logprob_start_len_adds_the_prompts_logprobs(gateway: GatewayServer) -> None:
    body = {"input_ids": [5, 6, 7, 8], "sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 2}
    meta = generate(gateway, {**body, "logprob_start_len": 0})["meta_info"]
    prompt = meta["input_token_logprobs"]
    assert [t[1] for t in prompt] == [5, 6, 7, 8]
    assert prompt[0] == [None, 5, None]  # nothing predicts the first token
    assert all(isinstance(t[0], float) and t[0] <= 0 for t in prompt[1:])
    tops = meta["input_top_logprobs"]
    assert tops[0] is None and all(len(top) == 2 for top in tops[1:])
    assert len(meta["output_token_logprobs"]) == 8

    openai = completion(gateway, [5, 6, 7, 8], max_tokens=1, temperature=0, echo=True, logprobs=0)
    echoed = openai["choices"][0]["logprobs"]["token_logprobs"][:4]
    assert [t[0] for t in prompt[1:]] == pytest.approx(echoed[1:], abs=1e-6)

    tail = generate(gateway, {**body, "logprob_start_len": 2})["meta_info"]
    assert tail["input_token_logprobs"] == prompt[2:]
    assert generate(gateway, body)["meta_info"]["input_token_logprobs"] == []  # -1: output tokens only


def test_rid_is_the_request_id(gateway: GatewayServer, workers: list[WorkerProcess]) -> None:
    out = generate(gateway, {"text": PROMPT, "rid": "native-rid-1", "sampling_params": GREEDY})
    assert out["meta_info"]["id"] == "native-rid-1"
    batch = generate(gateway, {"text": [PROMPT, OTHER], "rid": ["native-a", "native-b"], "sampling_params": GREEDY})
    assert [b["meta_info"]["id"] for b in batch] == ["native-a", "native-b"]
    prefixed = generate(gateway, {"text": [PROMPT, OTHER], "rid": "native-c", "sampling_params": GREEDY})
    assert [b["meta_info"]["id"] for b in prefixed] == ["native-c_0", "native-c_1"]
    deadline = time.monotonic() + 10
    while not any(r["request_id"].startswith("native-rid-1") for w in workers for r in w.request_records()):
        assert time.monotonic() < deadline, "no worker logged a request named by the rid"
        time.sleep(0.05)


def test_a_stop_string_cuts_the_text_and_is_reported_as_matched(stack: GatewayServer) -> None:
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    full = generate(stack, {"text": PROMPT, "sampling_params": params})["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"the greedy output has no usable stop string: {full!r}"
    cut = generate(stack, {"text": PROMPT, "sampling_params": {**params, "stop": stop}})
    assert cut["text"] == full[: full.index(stop)]
    assert cut["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    streamed = stream(stack, {"text": PROMPT, "sampling_params": {**params, "stop": [stop]}})[-1]
    assert streamed["text"] == cut["text"] and streamed["meta_info"]["finish_reason"] == {
        "type": "stop",
        "matched": stop,
    }


def test_a_stop_token_is_reported_as_matched_and_ends_output_ids(gateway: GatewayServer) -> None:
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    full = generate(gateway, {"text": PROMPT, "sampling_params": params})["output_ids"]
    token = full[5]
    k = full.index(token)
    out = generate(gateway, {"text": PROMPT, "sampling_params": {**params, "stop_token_ids": [token]}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": token}
    assert out["output_ids"] == full[: k + 1]  # as SGLang's: the matched stop token is the last id
    assert out["meta_info"]["completion_tokens"] == k + 1


def test_a_regex_constrains_the_output(gateway: GatewayServer) -> None:
    out = generate(gateway, {"text": PROMPT, "sampling_params": {"regex": "(yes|no)", "max_new_tokens": 16}})
    assert out["text"] in ("yes", "no")
    assert out["meta_info"]["finish_reason"]["type"] == "stop"


def test_a_json_schema_constrains_the_output(gateway: GatewayServer) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = {"text": PROMPT, "sampling_params": {"json_schema": json.dumps(schema), "max_new_tokens": 64}}
    out = generate(gateway, body)
    assert isinstance(json.loads(out["text"])["a"], int)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": PROMPT, "input_ids": [1, 2]}, "input_ids"),
        ({"sampling_params": GREEDY}, "text"),
        ({"text": ""}, "text"),
        ({"text": [PROMPT, ""]}, "text"),
        ({"text": []}, "text"),
        ({"text": 5}, "text"),
        ({"input_ids": []}, "input_ids"),
        ({"input_ids": [[1, 2], []]}, "input_ids"),
        ({"input_ids": [1, "two"]}, "input_ids.1"),
        ({"input_ids": [100000]}, "input_ids"),  # outside the vocabulary: the worker refuses it
        ({"text": PROMPT, "sampling_params": {"max_tokens": 4}}, "sampling_params.max_tokens"),
        ({"text": PROMPT, "sampling_params": {"seed": 1}}, "sampling_params.seed"),
        ({"text": PROMPT, "sampling_params": {"max_new_tokens": "ten"}}, "sampling_params.max_new_tokens"),
        ({"text": PROMPT, "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature"),
        ({"text": PROMPT, "sampling_params": {"stop": ""}}, "sampling_params.stop"),
        ({"text": PROMPT, "sampling_params": {"min_new_tokens": 3}}, "sampling_params.min_new_tokens"),
        ({"text": PROMPT, "sampling_params": {"n": 0}}, "sampling_params.n"),
        ({"text": PROMPT, "sampling_params": {"n": 1000}}, "sampling_params.n"),
        ({"text": PROMPT, "sampling_params": {"n": 20}}, "sampling_params.n"),  # over the worker's --max-n
        ({"text": PROMPT, "sampling_params": {"regex": "a", "ebnf": 'root ::= "a"'}}, "sampling_params.ebnf"),
        ({"text": PROMPT, "sampling_params": {"json_schema": "{not json"}}, "sampling_params.json_schema"),
        ({"text": PROMPT, "sampling_params": {"logit_bias": {"x": 1.0}}}, "sampling_params.logit_bias"),
        ({"text": PROMPT, "sampling_params": 5}, "sampling_params"),
        ({"text": [PROMPT, OTHER], "sampling_params": [{}, {}, {}]}, "sampling_params"),
        ({"text": [PROMPT, OTHER], "sampling_params": [{}, {"temperature": -1}]}, "sampling_params.1.temperature"),
        ({"text": [PROMPT, OTHER], "sampling_params": [{"n": 2}, {}]}, "sampling_params.n"),
        ({"text": [PROMPT, OTHER], "rid": ["only-one"]}, "rid"),
        ({"text": [PROMPT, OTHER], "rid": ["same", "same"]}, "rid"),
        ({"text": PROMPT, "rid": ["a"]}, "rid"),
        ({"text": PROMPT, "return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num"),
        ({"text": PROMPT, "return_logprob": True, "logprob_start_len": -2}, "logprob_start_len"),
        ({"text": [PROMPT, OTHER], "return_logprob": True, "logprob_start_len": [0]}, "logprob_start_len"),
        ({"text": PROMPT, "image_data": "cat.png"}, "image_data"),
        ({"text": PROMPT, "bogus": 1}, "bogus"),
    ],
)
def test_bad_input_gets_400_naming_the_field(gateway: GatewayServer, body: dict[str, Any], param: str) -> None:
    error = generate(gateway, body, status=400)["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]


def test_harmless_sglang_fields_are_accepted(gateway: GatewayServer) -> None:
    body = {
        "text": PROMPT,
        "sampling_params": {**GREEDY, "min_new_tokens": 0, "no_stop_trim": False, "stream_interval": 4},
        "logprob_start_len": -1,
        "image_data": None,
        "log_metrics": False,
    }
    assert generate(gateway, body)["meta_info"]["completion_tokens"] == 8


def test_the_native_routes_take_the_api_key_except_health_generate(gateway: GatewayServer) -> None:
    assert httpx.post(gateway.url + "/generate", json={"text": PROMPT}).status_code == 401
    assert httpx.get(gateway.url + "/get_model_info").status_code == 401
    assert httpx.get(gateway.url + "/get_server_info").status_code == 401
    assert httpx.get(gateway.url + "/health_generate", timeout=30).status_code == 200


def test_a_client_that_leaves_cancels_its_generation(gateway: GatewayServer, workers: list[WorkerProcess]) -> None:
    """Streamed or not, the worker aborts every completion of a request whose client hung up."""
    context = httpx.get(gateway.url + "/get_model_info", headers=HEADERS).json()["max_context_length"]
    long = {"max_new_tokens": context // 2, "ignore_eos": True, "n": 4}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gateway.url + "/generate",
            json={"text": PROMPT, "rid": "leaver-whole", "sampling_params": long},
            headers=HEADERS,
            timeout=0.5,
        )
    body = {"text": PROMPT, "rid": "leaver-stream", "stream": True, "sampling_params": long}
    with httpx.stream("POST", gateway.url + "/generate", json=body, headers=HEADERS, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 20
    while True:
        records = {
            r["request_id"].split("-")[1]: r
            for w in workers
            for r in w.request_records()
            if r["request_id"].startswith("leaver-")
        }
        if len(records) == 2:
            break
        assert time.monotonic() < deadline, records
        time.sleep(0.05)
    for record in records.values():
        assert record["finish_reason"] == ",".join(["abort"] * 4), record
    while gateway.metrics()[("sfllm_gateway:num_requests_running", ())] != 0:
        assert time.monotonic() < deadline, "the gateway still counts the requests in flight"
        time.sleep(0.05)


# ----------------------------------------------------------------------------------- the other routes


def test_get_model_info(gateway: GatewayServer, model_name: str, qwen3_path: str) -> None:
    info = httpx.get(gateway.url + "/get_model_info", headers=HEADERS).json()
    assert info["is_generation"] is True
    assert info["served_model_name"] == model_name
    assert info["model_type"] == "qwen3"
    assert info["max_context_length"] > 0 and info["vocab_size"] > 0
    assert info["model_path"] in (None, qwen3_path)  # None while a worker does not say
    assert info["tokenizer_path"] == info["model_path"]
    named = httpx.get(gateway.url + "/get_model_info", params={"model": model_name}, headers=HEADERS)
    assert named.json() == info
    unknown = httpx.get(gateway.url + "/get_model_info", params={"model": "no-such-model"}, headers=HEADERS)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_get_server_info(gateway: GatewayServer, workers: list[WorkerProcess], model_name: str) -> None:
    response = httpx.get(gateway.url + "/get_server_info", headers=HEADERS)
    assert API_KEY not in response.text
    info = response.json()
    assert info["version"]
    assert info["settings"]["policy"] == "round_robin" and info["settings"]["api_keys"] == 1
    assert info["settings"]["workers"] == [w.target for w in workers]
    assert [w["address"] for w in info["workers"]] == sorted(w.target for w in workers)
    for worker in info["workers"]:
        assert worker["healthy"] is True and worker["model"] == model_name
        assert set(worker["load"]) == {"num_running", "num_waiting", "kv_cache_usage"}
        assert worker["max_context_length"] > 0


def test_health_generate_makes_a_token(gateway: GatewayServer, model_name: str) -> None:
    response = httpx.get(gateway.url + "/health_generate", timeout=30)
    assert response.status_code == 200
    assert response.json()["status"] == "ok" and response.json()["model"] == model_name


def test_health_generate_is_503_once_the_worker_is_gone(qwen3_path: str, tmp_path: Path) -> None:
    with worker_behind_gateway(Path(qwen3_path), tmp_path, "doomed") as (worker, gateway):
        assert httpx.get(gateway.url + "/health_generate", timeout=30).status_code == 200
        worker.kill()
        response = httpx.get(gateway.url + "/health_generate", timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "no_healthy_worker"
        assert re.search("could generate", response.json()["error"]["message"])
