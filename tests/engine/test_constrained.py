"""Constrained decoding end to end: every output parses and follows its JSON schema, regex or grammar.

The tiny random Qwen3 (a byte-level BPE) draws from almost uniform logits, so it tries every path
a grammar leaves open; schemas bound their strings, arrays and integers so that it finishes.
"""

import asyncio
import json
import re
from pathlib import Path

import pytest
import torch

from sfllm_core.engine.grammar import GrammarBackend, check_constraint
from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.engine.request_sequence import RequestSequence
from sfllm_core.errors import InvalidRequestError
from sfllm_core.layers.sampler import Sampler
from sfllm_core.sampling_params import Constraint, SamplingParams

SCHEMAS = {
    "enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3, None]}},
        "required": ["color", "size"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 6}, "admin": {"type": "boolean"}},
                "required": ["name", "admin"],
            },
            "id": {"type": "integer", "minimum": 0, "maximum": 999},
        },
        "required": ["user", "id"],
    },
    "integers": {
        "type": "array",
        "items": {"type": "integer", "minimum": -50, "maximum": 50},
        "minItems": 1,
        "maxItems": 4,
    },
    "optional_keys": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 8},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        },
        "required": ["title"],
    },
}
REGEX = r"(cat|dog)s? [0-9]{1,3}( (red|blue))?"
EBNF = 'root ::= answer ("; " answer){0,2}\nanswer ::= "yes" | "no" | "maybe"'
EBNF_FORM = re.compile(r"(yes|no|maybe)(; (yes|no|maybe)){0,2}")
# Temperature 0, and temperature 1 with two seeds.
SETTINGS = [dict(temperature=0.0), dict(temperature=1.0, seed=1), dict(temperature=1.0, seed=2)]


def conforms(value, schema: dict) -> bool:
    """The subset of JSON Schema these tests use; objects take no keys besides their properties."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "object":
        props = schema.get("properties", {})
        return (
            isinstance(value, dict)
            and set(value) <= set(props)
            and set(schema.get("required", [])) <= set(value)
            and all(conforms(v, props[k]) for k, v in value.items())
        )
    if kind == "array":
        return (
            isinstance(value, list)
            and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value))
            and all(conforms(v, schema["items"]) for v in value)
        )
    if kind == "string":
        length = len(value) if isinstance(value, str) else -1
        return schema.get("minLength", 0) <= length <= schema.get("maxLength", length)
    if kind == "integer":
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and schema.get("minimum", value) <= value <= schema.get("maximum", value)
        )
    if kind == "boolean":
        return isinstance(value, bool)
    raise AssertionError(f"the test's validator does not know {kind!r}")


def json_params(schema: dict, **settings) -> SamplingParams:
    settings.setdefault("max_tokens", 120)
    return SamplingParams(constraint=Constraint("json_schema", json.dumps(schema)), **settings)


def assert_clean(engine: InferenceEngine) -> None:
    assert engine.grammar.num_matchers == 0, "matchers leaked"
    assert not engine._grammar_queue and not engine._seqs
    assert engine.pool.num_used_pages == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting


@pytest.fixture(scope="module")
def qwen(qwen3_path) -> InferenceEngine:
    return InferenceEngine(model_path=str(qwen3_path), dtype="float32")


def _prompts(engine: InferenceEngine, n: int) -> list[list[int]]:
    texts = ["The capital of France is", "Numbers like", "She sells sea shells", "A quick brown fox"]
    return [engine.encode(texts[i % len(texts)]) for i in range(n)]


# ---- outputs follow their constraint -------------------------------------------------------------


def test_json_outputs_parse_and_follow_their_schema(qwen):
    cases = [(name, settings) for name in SCHEMAS for settings in SETTINGS]
    params = [json_params(SCHEMAS[name], **settings) for name, settings in cases]
    outputs = qwen.generate(_prompts(qwen, len(cases)), params)
    for (name, settings), out in zip(cases, outputs):
        assert out.finish_reason == "stop", (name, settings, out.text)
        assert conforms(json.loads(out.text), SCHEMAS[name]), (name, settings, out.text)
    assert_clean(qwen)


def test_json_object_regex_and_ebnf_outputs_match(qwen):
    # '}' and '"' favoured, so that the random model's free-form objects close within the budget.
    close = {qwen.tokenizer.convert_tokens_to_ids(t): 4.0 for t in ("}", '"')}
    cases = []
    for settings in SETTINGS:
        cases.append(("json_object", SamplingParams(max_tokens=200, constraint=Constraint("json_object"),
                                                    logit_bias=close, **settings)))  # fmt: skip
        cases.append(("regex", SamplingParams(max_tokens=40, constraint=Constraint("regex", REGEX), **settings)))
        cases.append(("ebnf", SamplingParams(max_tokens=40, constraint=Constraint("ebnf", EBNF), **settings)))
    outputs = qwen.generate(_prompts(qwen, len(cases)), [p for _, p in cases])
    for (kind, _), out in zip(cases, outputs):
        assert out.finish_reason == "stop", (kind, out.text)
        if kind == "json_object":
            assert isinstance(json.loads(out.text), dict), out.text
        elif kind == "regex":
            assert re.fullmatch(REGEX, out.text), out.text
        else:
            assert EBNF_FORM.fullmatch(out.text), out.text
    assert_clean(qwen)


def test_real_gemma_follows_schema_object_regex_and_grammar(gemma270m_path):
    engine = InferenceEngine(model_path=gemma270m_path, dtype="float32")

    def chat(text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        return engine.encode(engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        },
        "required": ["name", "age"],
    }
    # Left alone, the 270M model adds key after key to a free-form object: closing is favoured a little.
    vocab = engine.tokenizer.get_vocab()
    close = {vocab["}"]: 2.0, vocab['"}']: 2.0}
    cases = [
        ("person", chat("Describe a person as JSON."), json_params(person, temperature=0.0, max_tokens=40)),
        ("person", chat("Describe a person as JSON."), json_params(person, temperature=1.0, seed=3, max_tokens=40)),
        ("object", chat('Reply with the JSON object {"ok": true} and nothing else.'),
         SamplingParams(max_tokens=30, temperature=0.0, constraint=Constraint("json_object"), logit_bias=close)),
        ("regex", chat("Name an animal and a number."),
         SamplingParams(max_tokens=20, temperature=1.0, seed=4, constraint=Constraint("regex", REGEX))),
        ("ebnf", chat("Is the sky blue?"),
         SamplingParams(max_tokens=20, temperature=0.0, constraint=Constraint("ebnf", EBNF))),
    ]  # fmt: skip
    outputs = engine.generate([p for _, p, _ in cases], [sp for _, _, sp in cases])
    for (kind, _, _), out in zip(cases, outputs):
        assert out.finish_reason == "stop", (kind, out.text)
        if kind == "person":
            assert conforms(json.loads(out.text), person), out.text
        elif kind == "object":
            assert isinstance(json.loads(out.text), dict), out.text
        elif kind == "regex":
            assert re.fullmatch(REGEX, out.text), out.text
        else:
            assert EBNF_FORM.fullmatch(out.text), out.text
    assert_clean(engine)


# ---- constrained and free rows in one batch ------------------------------------------------------


def test_free_requests_batched_with_constrained_ones_are_unchanged(qwen):
    free = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompts = _prompts(qwen, 4)
    alone = [qwen.generate([p], free)[0].token_ids for p in prompts[:2]]
    nested, enums = json_params(SCHEMAS["nested"], temperature=0.0), json_params(SCHEMAS["enums"], temperature=1.0)
    params = [free, nested, free, enums]
    outputs = qwen.generate([prompts[0], prompts[2], prompts[1], prompts[3]], params)
    assert [outputs[0].token_ids, outputs[2].token_ids] == alone
    assert conforms(json.loads(outputs[1].text), SCHEMAS["nested"])
    assert conforms(json.loads(outputs[3].text), SCHEMAS["enums"])
    assert_clean(qwen)


def test_sampler_masks_only_the_constrained_rows(qwen):
    backend = GrammarBackend(qwen.vocab_size, qwen.tokenizer)
    compiled = backend.compile(Constraint("regex", "x"), qwen.eos_token_ids).result()
    seqs = [RequestSequence(str(i), [1, 2], SamplingParams(temperature=0.0)) for i in range(3)]
    constrained = RequestSequence("c", [1, 2], SamplingParams(temperature=0.0, constraint=Constraint("regex", "x")))
    constrained.grammar = backend.matcher(compiled, qwen.eos_token_ids)
    seqs.insert(1, constrained)
    logits = torch.randn(4, qwen.vocab_size)
    raw = logits.clone()
    tokens, _ = Sampler()(logits, seqs)
    x = qwen.tokenizer.convert_tokens_to_ids("x")
    assert tokens[1] == x
    assert [tokens[i] for i in (0, 2, 3)] == raw[[0, 2, 3]].argmax(-1).tolist()
    assert torch.equal(logits, raw), "the caller's logits are left as they were"
    # The matcher took 'x': the regex is complete, and only a stop token may follow.
    assert constrained.grammar.rejected is None and constrained.grammar.matcher.is_completed()
    constrained.grammar.close()
    assert backend.num_matchers == 0
    backend.shutdown()


def test_logprobs_are_those_of_the_raw_distribution(qwen):
    prompt = _prompts(qwen, 1)[0]
    free = qwen.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=5))[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=5,
                            constraint=Constraint("regex", "zz+"))  # fmt: skip
    constrained = qwen.generate([prompt], params)[0]
    first = constrained.logprobs[0]
    assert qwen.tokenizer.decode([first.token_id]).startswith("z")
    assert first.top == free.logprobs[0].top  # the same distribution, unmasked
    assert first.logprob <= first.top[0][1]


# ---- how constrained requests end -----------------------------------------------------------------


def test_a_complete_grammar_stops_even_with_ignore_eos(qwen):
    params = SamplingParams(max_tokens=30, temperature=1.0, seed=0, ignore_eos=True,
                            constraint=Constraint("regex", "(yes|no)"))  # fmt: skip
    out = qwen.generate(_prompts(qwen, 1), params)[0]
    assert out.finish_reason == "stop" and out.text in ("yes", "no")
    # The stop token the grammar ended on is not part of the output.
    qwen.add_request("r", _prompts(qwen, 1)[0], params)
    outputs = []
    while not (outputs and outputs[-1].finished):
        outputs += [o for o in qwen.step() if o.request_id == "r"]
    assert outputs[-1].finish_reason == "stop" and outputs[-1].stop_token_id in qwen.eos_token_ids
    assert_clean(qwen)


def test_max_tokens_still_cuts_a_constrained_output(qwen):
    out = qwen.generate(_prompts(qwen, 1), SamplingParams(max_tokens=3, temperature=0.0,
                                                          constraint=Constraint("regex", "[a-z]{10}")))[0]  # fmt: skip
    assert out.finish_reason == "length" and len(out.token_ids) == 3
    assert re.fullmatch("[a-z]+", out.text)
    assert_clean(qwen)


def test_matchers_are_freed_on_abort_while_compiling_or_running(qwen):
    params = json_params(SCHEMAS["optional_keys"], temperature=1.0, seed=5)
    qwen.add_request("compiling", _prompts(qwen, 1)[0], params)
    qwen.abort("compiling")  # read in the same step that queues it, before its matcher exists
    qwen.add_request("running", _prompts(qwen, 1)[0], params)
    for _ in range(100):
        qwen.step()
        if qwen.grammar.num_matchers:
            break
    assert qwen.grammar.num_matchers == 1
    qwen.abort("running")
    finished = [o for o in qwen.step() if o.finished]
    assert [o.finish_reason for o in finished] == ["abort"]
    assert_clean(qwen)
    qwen.add_request("shutdown", _prompts(qwen, 1)[0], params)
    qwen.step()
    qwen.abort_all()
    assert_clean(qwen)


def test_preempted_constrained_sequences_keep_their_grammar_state(qwen3_path, qwen):
    prompts = _prompts(qwen, 6)
    params = [json_params(SCHEMAS["optional_keys"], temperature=0.0)] * 3 + [
        json_params(SCHEMAS["nested"], temperature=1.0, seed=s) for s in range(3)
    ]
    expected = [o.token_ids for o in qwen.generate(prompts, params)]
    tight = InferenceEngine(model_path=str(qwen3_path), dtype="float32", num_pages=40, page_size=4)
    got = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in got] == expected
    assert_clean(tight)


def test_streaming_a_constrained_request(qwen3_path):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32")

    async def run() -> list:
        return [o async for o in engine.stream(_prompts(engine, 1)[0], json_params(SCHEMAS["enums"], temperature=0.0))]

    try:
        outputs = asyncio.run(run())
    finally:
        engine.shutdown()
    text = engine.tokenizer.decode([t for o in outputs for t in o.token_ids])
    assert outputs[-1].finish_reason == "stop" and conforms(json.loads(text), SCHEMAS["enums"])


# ---- refusals and the tokenizer ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "constraint, named",
    [
        (Constraint("json_schema", '{"type": "objec"}'), "JSON schema"),
        (Constraint("json_schema", '{"type": '), "JSON schema"),
        (Constraint("json_schema", ""), "JSON schema"),
        (Constraint("regex", "(ab"), "regex"),
        (Constraint("ebnf", "root ::= missing_rule"), "EBNF grammar"),
        (Constraint("ebnf", 'start ::= "a"'), "EBNF grammar"),
    ],
)
def test_an_invalid_constraint_is_refused_before_it_queues(qwen, constraint, named):
    params = SamplingParams(constraint=constraint)
    with pytest.raises(InvalidRequestError) as info:
        qwen.add_request("bad", [1, 2, 3], params)
    assert info.value.param == "constraint" and named in info.value.message
    with pytest.raises(InvalidRequestError):  # without a tokenizer too: the worker's front checks this way
        check_constraint(constraint)
    assert not qwen._inbox


def test_an_engine_without_tokenizer_reads_the_tokenizer_file(qwen3_path, qwen):
    params = json_params(SCHEMAS["nested"], temperature=0.0)
    prompt = _prompts(qwen, 1)[0]
    bare = InferenceEngine(model_path=str(qwen3_path), dtype="float32", load_tokenizer=False)
    with pytest.raises(InvalidRequestError) as info:
        bare.add_request("r", prompt, params)
    assert info.value.param == "constraint"
    bare.use_tokenizer_file(str(Path(qwen3_path) / "tokenizer.json"))
    assert bare.generate([prompt], params)[0].token_ids == qwen.generate([prompt], params)[0].token_ids


def test_a_grammar_that_fails_to_compile_ends_its_request_with_an_error(qwen3_path, tmp_path):
    bare = InferenceEngine(model_path=str(qwen3_path), dtype="float32", load_tokenizer=False)
    bare.use_tokenizer_file(str(tmp_path / "missing.json"))
    bare.add_request("r", [1, 2, 3], json_params(SCHEMAS["enums"], temperature=0.0))
    bare.add_request("free", [1, 2, 3], SamplingParams(max_tokens=4, ignore_eos=True))
    ended = {}
    while len(ended) < 2:
        ended.update({o.request_id: o for o in bare.step() if o.finished})
    assert ended["r"].finish_reason == "error" and "compile" in ended["r"].error
    assert ended["free"].finish_reason == "length"
    assert_clean(bare)


# ---- on a GPU ---------------------------------------------------------------------------------------


def _agree_until_near_tie(ours, ref, gap: float = 1e-3) -> None:
    """Greedy outputs of two batchings: equal, or parting only where the reference's top two tie within gap."""
    part = next((i for i, (x, y) in enumerate(zip(ours.token_ids, ref.token_ids)) if x != y), None)
    if part is not None:
        (_, lp1), (_, lp2) = ref.logprobs[part].top[:2]
        assert lp1 - lp2 <= gap, f"parted at token {part}, where the top two are {lp1 - lp2:.5f} apart"


@pytest.mark.gpu
def test_constrained_and_free_rows_on_cuda(qwen3_path):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32", device="cuda", kv_cache_memory_gb=0.5,
                             max_num_seqs=16, cuda_graph_max_batch=16)  # fmt: skip
    assert engine.runner.graphs is not None
    free = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    prompts = _prompts(engine, 8)
    alone = engine.generate(prompts[:4], free)
    cases = [(name, settings) for name in ("nested", "integers") for settings in SETTINGS[:2]]
    params = [free] * 4 + [json_params(SCHEMAS[name], **settings) for name, settings in cases]
    overlapped = engine.num_overlapped_steps
    outputs = engine.generate(prompts[:4] + prompts[4:8], params)
    for out, ref in zip(outputs[:4], alone):
        _agree_until_near_tie(out, ref)
    for (name, _), out in zip(cases, outputs[4:]):
        assert out.finish_reason == "stop" and conforms(json.loads(out.text), SCHEMAS[name]), out.text
    # The free rows overlap their steps again once the constrained ones are done (within ~40 tokens).
    assert engine.num_overlapped_steps > overlapped
    assert_clean(engine)
