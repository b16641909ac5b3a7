"""N-gram drafts (prompt lookup): continue the sequence the way its own text went on before.

The last n tokens of a sequence (n from ngram_max down to ngram_min) are looked up in its prompt
and output; where they occurred before, the tokens that followed there are the drafts. Each
sequence keeps an index from every n-gram to where its latest earlier occurrence ended, brought
up to date with the tokens added since the last proposal: the host work per step does not grow
with the context.
"""

from sfllm_core.engine.request_sequence import RequestSequence
from sfllm_core.engine.speculative import DraftProposer


class _NgramIndex:
    __slots__ = ("ends", "upto")

    def __init__(self, sizes: range) -> None:
        self.ends: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}
        self.upto = 0  # n-grams ending before this position (with a token after them) are indexed


class NgramProposer(DraftProposer):
    """Prompt-lookup drafts of up to k tokens, from the longest matching suffix of ngram_min..ngram_max tokens."""

    def __init__(self, num_speculative_tokens: int, ngram_max: int, ngram_min: int) -> None:
        super().__init__(num_speculative_tokens)
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min} and {ngram_max}")
        self.sizes = range(ngram_max, ngram_min - 1, -1)

    def draft(self, seq: RequestSequence, limit: int) -> list[int]:
        if seq.drafter_state is None:
            seq.drafter_state = {}
        index = seq.drafter_state.get("ngram")
        if index is None:
            index = seq.drafter_state["ngram"] = _NgramIndex(self.sizes)
        tokens = seq.token_ids
        length = len(tokens)
        # Index every n-gram that ends at e <= length - 1 (the token at e follows it); the latest
        # occurrence overwrites earlier ones, so a lookup finds the most recent.
        for e in range(max(index.upto, 1), length):
            for n, ends in index.ends.items():
                if e >= n:
                    ends[tuple(tokens[e - n : e])] = e
        index.upto = max(index.upto, length)
        for n, ends in index.ends.items():
            if length < n:
                continue
            e = ends.get(tuple(tokens[length - n :]))
            if e is not None:
                return tokens[e : min(e + limit, length)]
        return []
