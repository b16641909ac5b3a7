"""Constrained decoding through a real worker: its engine process, loaded without a tokenizer, reads the
front's tokenizer file (TokenizerFile) to build the grammar's vocabulary."""

import json

import grpc
import pytest

from protos.sfllm.v1 import worker_pb2 as pb

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "score": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer", "score"],
}


def test_every_completion_follows_the_schema(client):
    completion = client.generate("The capital of France", max_tokens=60, temperature=1.0, seed=3, n=3,
                                 constraint=pb.Constraint(json_schema=json.dumps(SCHEMA)))  # fmt: skip
    for choice in completion.choices:
        value = json.loads(choice.text)
        assert choice.finish_reason == "stop" and set(value) == {"answer", "score"}
        assert value["answer"] in ("yes", "no") and 0 <= value["score"] <= 9


def test_a_complete_regex_stops_on_an_eos_token_even_with_ignore_eos(client, reference_engine):
    completion = client.generate("The capital", max_tokens=20, temperature=0.0, ignore_eos=True,
                                 constraint=pb.Constraint(regex="(yes|no)"))  # fmt: skip
    (choice,) = completion.choices
    assert choice.finish_reason == "stop" and choice.text in ("yes", "no")
    assert choice.stop in reference_engine.eos_token_ids


def test_an_invalid_schema_is_refused_naming_the_constraint(client):
    with pytest.raises(grpc.RpcError) as info:
        client.generate("x", constraint=pb.Constraint(json_schema='{"type": "objec"}'))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "JSON schema" in info.value.details() and "objec" in info.value.details()
