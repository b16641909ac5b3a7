"""What an engine change that must not change a token is checked with: the same greedy outputs."""


def assert_same_greedy(got, want, num_tokens: int) -> None:
    """Greedy GenerationOutputs equal token for token: ids, their logprobs (within 1e-4) and top ids."""
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want):
        assert len(a.logprobs) == len(b.logprobs) == num_tokens
        for x, y in zip(a.logprobs, b.logprobs):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-4
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
