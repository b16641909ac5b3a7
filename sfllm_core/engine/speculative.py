"""Speculative decoding: draft proposers, and the rows a verify step samples.

A verify step feeds a decoding sequence its last token followed by its drafts d1..dm, and gets
m + 1 rows of logits: row j is the distribution of the token after d1..dj. Each row is sampled
as an ordinary step would sample that position (same penalties over the same history, same
top-k / top-p / min-p, a seeded row's noise from the same output index), and the drafts are
accepted while they equal the sampled tokens; the first token that differs, or the one after
the last draft, is kept too. For drafts that are a function of the context (n-gram lookup, a
greedy draft model: a point-mass proposal), this is the speculative-sampling rule exactly:
the draft x is accepted with probability p(x), and on rejection the token kept is a draw from p
with x removed, renormalised (the sampled token given that it is not x). So the output has the
target distribution, and a seeded request draws the very tokens it draws without speculation.
"""

from abc import ABC, abstractmethod

from sfllm_core.engine.request_sequence import RequestSequence

# A proposer that found nothing (or had every draft rejected) for a sequence waits this many
# steps at most before it tries again: the wait doubles from 1 after each miss in a row.
MAX_BACKOFF_STEPS = 16


class DraftRow:
    """Row j of a verify step as the Sampler sees it: the sequence with its first j drafts appended."""

    __slots__ = ("seq", "j")

    def __init__(self, seq: RequestSequence, j: int) -> None:
        self.seq, self.j = seq, j

    @property
    def params(self):
        return self.seq.params

    @property
    def adjusts_logits(self) -> bool:
        return self.seq.adjusts_logits

    grammar = None  # constrained sequences are never drafted for

    @property
    def num_prompt_tokens(self) -> int:
        return self.seq.num_prompt_tokens

    @property
    def num_tokens(self) -> int:
        return self.seq.num_tokens + self.j

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.seq.draft_ids[: self.j]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.seq.num_prompt_tokens :]


def sample_rows(seqs: list[RequestSequence]) -> list:
    """The rows a step's logits hold for these sampled sequences: each one, then its draft rows."""
    rows: list = []
    for seq in seqs:
        rows.append(seq)
        rows += [DraftRow(seq, j) for j in range(1, len(seq.draft_ids) + 1)]
    return rows


def accepted_length(drafts: list[int], sampled: list[int]) -> int:
    """How many drafts the sampled tokens (one per row, len(drafts) + 1) confirm, from the first."""
    a = 0
    while a < len(drafts) and sampled[a] == drafts[a]:
        a += 1
    return a


class _Backoff:
    """Per sequence: steps left to wait before the next proposal, and the wait after a miss."""

    __slots__ = ("wait", "next_wait")

    def __init__(self) -> None:
        self.wait, self.next_wait = 0, 1


class DraftProposer(ABC):
    """Proposes draft tokens for decoding sequences; backs off from those it keeps missing.

    `wants` is asked each step without reading any token (it may run while the previous step's
    tokens are still on the GPU); `propose` then reads the sequence's tokens, all known.
    """

    def __init__(self, num_speculative_tokens: int) -> None:
        self.k = num_speculative_tokens
        self.num_proposals = 0  # sequences drafted for, summed over steps
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    def wants(self, seq: RequestSequence) -> bool:
        """Whether to propose for seq this step (counts down its back-off)."""
        state = seq.drafter_state.get("backoff") if seq.drafter_state else None
        if state is None or state.wait == 0:
            return True
        state.wait -= 1
        return False

    @abstractmethod
    def draft(self, seq: RequestSequence, limit: int) -> list[int]:
        """Up to limit draft tokens to follow seq.token_ids (all known)."""

    def propose(self, seq: RequestSequence, limit: int) -> list[int]:
        drafts = self.draft(seq, min(limit, self.k)) if limit > 0 else []
        if not drafts:
            self._miss(seq)
        return drafts

    def observe(self, seq: RequestSequence, num_drafts: int, num_accepted: int) -> None:
        """A verify step's result for seq: rejections of everything count as a miss."""
        self.num_proposals += 1
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted
        if num_accepted == 0:
            self._miss(seq)
        else:
            state = self._state(seq)
            state.wait, state.next_wait = 0, 1

    def _state(self, seq: RequestSequence) -> _Backoff:
        if seq.drafter_state is None:
            seq.drafter_state = {}
        state = seq.drafter_state.get("backoff")
        if state is None:
            state = seq.drafter_state["backoff"] = _Backoff()
        return state

    def _miss(self, seq: RequestSequence) -> None:
        state = self._state(seq)
        state.wait = state.next_wait
        state.next_wait = min(2 * state.next_wait, MAX_BACKOFF_STEPS)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens a verify step yields per sequence on average (accepted drafts plus the one sampled)."""
        return 1 + self.num_accepted_tokens / self.num_proposals if self.num_proposals else 0.0


class SpeculationGate:
    """Whether a step may speculate, from what tokens have cost with and without it at this batch size.

    Steps run in stretches of one mode (drafts allowed or not) per batch size, rounded up to a power
    of two. Each step is timed from its start to the next one's, with the tokens it emitted; every
    step of a stretch counts, the first too: a speculative stretch's first step pays for bringing
    the n-gram index up to date with what the plain steps produced, a cost of speculating (an
    overlapped decode's tokens are read a step late, so each boundary moves one step's tokens and
    time across, both ways). A mode's cost per token is its decayed seconds over its decayed tokens
    (each stretch's sums weigh DECAY of the last), steadier than a mean of stretch ratios, which a
    stretch cut short by finishing sequences could swing. Once both modes are measured the cheaper
    one runs, and the other gets a stretch now and then to follow changes in acceptance: after 2
    stretches, then after twice as many each time it loses again (up to MAX_GAP), back to 2 when it
    wins. So speculation stands aside where the batch is large or drafts are poor, by measurement;
    no step's tokens change.
    """

    STRETCH = 4  # steps per stretch
    DECAY = 0.75  # weight of a mode's earlier sums against its latest stretch's
    MAX_GAP = 32  # most stretches between two tries of the losing mode

    def __init__(self) -> None:
        self._sums: dict[tuple[int, bool], tuple[float, float]] = {}  # (bucket, speculating): seconds, tokens
        self._state: dict[int, _GateState] = {}
        self._open: tuple[float, int, bool] | None = None  # the step being timed: start, bucket, counted
        self._previous: int | None = None  # the bucket of the step before, if it was timed
        self.num_steps_aside = 0  # steps in which the gate kept drafts back

    @staticmethod
    def bucket(num_decoding: int) -> int:
        return 1 << max(0, num_decoding - 1).bit_length()

    def cost(self, num_decoding: int, speculating: bool) -> float | None:
        """Measured seconds per token at this batch size in this mode (None until a stretch ends)."""
        return self._mode_cost(self.bucket(num_decoding), speculating)

    def _mode_cost(self, b: int, speculating: bool) -> float | None:
        sums = self._sums.get((b, speculating))
        return None if sums is None else sums[0] / sums[1]

    def record(self, now: float, tokens: int) -> None:
        """A step starts at `now`: the one timed before it ran until now and emitted `tokens`."""
        self._previous = None
        if self._open is not None:
            start, b, counted = self._open
            if counted:
                state = self._state[b]
                state.seconds += now - start
                state.tokens += tokens
            self._previous = b
        self._open = None

    def drop(self) -> None:
        """Time the step just run no further (nothing runs after it: the engine may sit idle)."""
        self._open = None

    def allow(self, num_decoding: int, now: float) -> bool:
        """Time the step of num_decoding sequences that started at `now`; whether it may speculate."""
        b = self.bucket(num_decoding)
        state = self._state.get(b)
        if state is None:
            state = self._state[b] = _GateState()
        if state.left == 0:
            self._next_stretch(b, state)
        counted = self._previous == b  # a step after one of another batch size is not this size's cost
        state.left -= 1
        self._open = (now, b, counted)
        if not state.speculating:
            self.num_steps_aside += 1
        return state.speculating

    def _next_stretch(self, b: int, state: "_GateState") -> None:
        if state.tokens:
            key = (b, state.speculating)
            seconds, tokens = self._sums.get(key, (0.0, 0.0))
            self._sums[key] = (self.DECAY * seconds + state.seconds, self.DECAY * tokens + state.tokens)
        state.seconds, state.tokens = 0.0, 0
        state.left = self.STRETCH
        spec, plain = self._mode_cost(b, True), self._mode_cost(b, False)
        if spec is None or plain is None:
            state.speculating = spec is None  # measure the mode not yet measured
            return
        best = spec <= plain
        if state.exploring:  # a try of the losing mode: wait twice as long for the next if it lost again
            state.gap = 2 if best == state.speculating else min(2 * state.gap, self.MAX_GAP)
            state.exploring = False
        elif best != state.speculating:  # the mode that ran lost its lead
            state.gap, state.since = 2, 0
        state.since += 1
        if state.since >= state.gap:
            state.since, state.exploring = 0, True
            best = not best
        state.speculating = best


class _GateState:
    """One batch size's stretch: its mode, steps left, the counted time and tokens so far, and how
    often the losing mode is tried."""

    __slots__ = ("speculating", "left", "seconds", "tokens", "gap", "since", "exploring")

    def __init__(self) -> None:
        self.speculating, self.left, self.seconds, self.tokens = True, SpeculationGate.STRETCH, 0.0, 0
        self.gap, self.since, self.exploring = 2, 0, False
