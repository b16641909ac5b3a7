"""The grammar backend of constrained decoding (xgrammar): syntax checks, compiled grammars, matchers, token masks.

A request's Constraint is parsed once when it is validated (no tokenizer needed), compiled
against the model's vocabulary on a worker thread (the engine loop keeps stepping other
sequences meanwhile), and then followed by one matcher per sequence: before each sampling its
matcher fills a bitmask of the tokens the grammar allows next, and afterwards it accepts the token
drawn. xgrammar is imported on first use only: the import costs seconds, which an engine that
never sees a constraint must not pay at start-up.
"""

import functools
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from sfllm_core.errors import InvalidRequestError
from sfllm_core.sampling_params import Constraint

MAX_COMPILED_GRAMMARS = 64  # compiled grammars kept for reuse, least recently used dropped first
_JSON_OBJECT_SCHEMA = '{"type": "object"}'
_KIND_NAMES = {"json_schema": "JSON schema", "json_object": "JSON object", "regex": "regex", "ebnf": "EBNF grammar"}
# xgrammar's messages start with a time stamp, a C++ source location and sometimes a failed check's text.
_MESSAGE_NOISE = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")
_MAX_MESSAGE = 300
# xgrammar 0.2.9 writes a string with minLength/maxLength as a repeat of this class, which lets
# raw control characters (invalid in JSON) through (its issue 800); its unbounded strings use the
# second. Inside a JSON grammar the class only ever matches string characters, so it is swapped.
_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"


def _xgrammar() -> Any:
    import xgrammar

    return xgrammar


# ---- syntax ------------------------------------------------------------------------------------


def check_constraint(constraint: Constraint) -> None:
    """Raise InvalidRequestError(..., "constraint") when the schema, regex or grammar does not parse."""
    if not isinstance(constraint.spec, str):
        raise InvalidRequestError("constraint spec must be a string", "constraint")
    if constraint.kind in ("json_schema", "regex", "ebnf") and not constraint.spec.strip():
        raise InvalidRequestError(f"the constraint's {_KIND_NAMES[constraint.kind]} is empty", "constraint")
    parse_constraint(constraint.kind, constraint.spec)


@functools.lru_cache(maxsize=256)
def parse_constraint(kind: str, spec: str) -> Any:
    """The xgrammar.Grammar of a constraint (cached: n completions and repeated requests parse once).

    JSON is generated without free whitespace (compact separators ", " and ": "): a model that
    may put any whitespace between tokens can pad forever instead of closing the object.
    """
    xgr = _xgrammar()
    try:
        if kind == "json_schema":
            return _without_raw_controls(xgr.Grammar.from_json_schema(spec, any_whitespace=False))
        if kind == "json_object":
            return xgr.Grammar.from_json_schema(_JSON_OBJECT_SCHEMA, any_whitespace=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "ebnf":
            return xgr.Grammar.from_ebnf(spec, root_rule_name="root")
    except Exception as exc:  # xgrammar reports every parse error as a RuntimeError (or ValueError)
        raise InvalidRequestError(f"invalid {_KIND_NAMES[kind]} in constraint: {_clean(exc)}", "constraint") from None
    raise InvalidRequestError(f"unknown constraint kind {kind!r}", "constraint")


def _without_raw_controls(grammar: Any) -> Any:
    text = str(grammar)
    if _BOUNDED_STRING_CHAR not in text:
        return grammar
    return _xgrammar().Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))


def _clean(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _MESSAGE_NOISE.sub("", text)
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


# ---- compiling and matching -------------------------------------------------------------------


class SequenceGrammar:
    """One sequence's matcher: where its output so far stands in its grammar."""

    __slots__ = ("matcher", "rejected", "_backend")

    def __init__(self, backend: "GrammarBackend", matcher: Any) -> None:
        self.matcher = matcher
        self.rejected: int | None = None  # a sampled token the grammar did not accept (a bug, or NaN logits)
        self._backend = backend

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and has taken a stop token: the sequence ends here."""
        return self.matcher.is_terminated()

    def close(self) -> None:
        """Drop the matcher (idempotent)."""
        if self.matcher is not None:
            self.matcher = None
            self._backend.num_matchers -= 1


class GrammarBackend:
    """Compiles constraints against one model's vocabulary, off the engine loop, and makes per-sequence matchers.

    The compiler is built on the first constraint, from the engine's tokenizer or a tokenizer.json
    file (an engine loaded without a tokenizer is given one: see `use_tokenizer_file`), with the
    model's vocab size (the logits' width, which may exceed the tokenizer's).
    """

    def __init__(self, vocab_size: int, tokenizer: Any = None, compile_threads: int = 2) -> None:
        self.vocab_size = vocab_size
        self.num_matchers = 0  # live SequenceGrammars (each closed when its sequence ends)
        self._tokenizer = tokenizer
        self._tokenizer_file: str | None = None
        self._compile_threads = compile_threads
        self._executor: ThreadPoolExecutor | None = None
        self._compiler: Any = None
        self._compiler_lock = threading.Lock()
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()

    @property
    def has_tokenizer(self) -> bool:
        return self._tokenizer is not None or self._tokenizer_file is not None

    def use_tokenizer_file(self, path: str) -> None:
        """Build the vocabulary from this tokenizer.json when no tokenizer object was given."""
        self._tokenizer_file = path

    def compile(self, constraint: Constraint, stop_token_ids: Iterable[int]) -> Future:
        """A future of the constraint's compiled grammar; a cached one may already be done.

        stop_token_ids (the engine's eos ids) are the tokens that end a complete grammar; only the
        first call's are used, to build the compiler. Call from one thread (the engine loop's).
        """
        key = (constraint.kind, constraint.spec)
        future = self._compiled.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._compiled.move_to_end(key)
            return future
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._compile_threads, thread_name_prefix="sfllm-grammar")
        future = self._executor.submit(self._compile, key, sorted(stop_token_ids))
        self._compiled[key] = future
        while len(self._compiled) > MAX_COMPILED_GRAMMARS:
            self._compiled.popitem(last=False)
        return future

    def matcher(self, compiled: Any, stop_token_ids: Iterable[int]) -> SequenceGrammar:
        """A fresh matcher of a compiled grammar; close it when its sequence ends."""
        stops = sorted(stop_token_ids)
        matcher = _xgrammar().GrammarMatcher(compiled, override_stop_tokens=stops or None)
        self.num_matchers += 1
        return SequenceGrammar(self, matcher)

    def shutdown(self) -> None:
        """Stop the compile threads; compiles not started yet are cancelled."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _compile(self, key: tuple[str, str], stop_token_ids: list[int]) -> Any:
        with self._compiler_lock:
            if self._compiler is None:
                self._compiler = self._build_compiler(stop_token_ids)
        return self._compiler.compile_grammar(parse_constraint(*key))

    def _build_compiler(self, stop_token_ids: list[int]) -> Any:
        xgr = _xgrammar()
        tokenizer = self._tokenizer
        if tokenizer is None:
            if self._tokenizer_file is None:
                raise RuntimeError("constrained decoding needs the model's tokenizer, and this engine has none")
            from transformers import PreTrainedTokenizerFast

            tokenizer = PreTrainedTokenizerFast(tokenizer_file=self._tokenizer_file)
        size = self.vocab_size
        # xgrammar detects how the vocabulary encodes bytes (byte-level, byte fallback, raw).
        detected = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=size, stop_token_ids=stop_token_ids or None)
        # Special tokens (control, unused, turn markers) are given as empty strings, which xgrammar
        # never lets a grammar produce: their text is not what the detokenizer shows, if anything.
        special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} - set(stop_token_ids)
        vocab = [""] * size
        for token, i in tokenizer.get_vocab().items():
            if i < size and i not in special:
                vocab[i] = token
        info = xgr.TokenizerInfo.from_vocab_and_metadata(vocab, detected.dump_metadata())
        threads = max(1, min(8, os.cpu_count() or 1))
        # Our own cache (compiled futures by constraint) replaces xgrammar's.
        return xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)


# ---- token masks, for the sampler -------------------------------------------------------------


def bitmask_width(vocab_size: int) -> int:
    """int32 words of one row's bitmask (a bit per token)."""
    return -(-vocab_size // 32)


def fill_bitmask(grammars: list[SequenceGrammar], bitmask: torch.Tensor) -> None:
    """Row i of the host bitmask [len(grammars), width] gets the tokens grammars[i] allows next."""
    if len(grammars) == 1:
        grammars[0].matcher.fill_next_token_bitmask(bitmask, 0)
    else:
        _batch_matcher().batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set to -inf, in place, the logits of rows[i] that bitmask[i] (on the logits' device) disallows."""
    xgr = _xgrammar()
    num_rows, vocab = logits.shape
    if len(rows) == num_rows:  # every row, in order
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab)
        return
    index = torch.tensor(rows, device=logits.device)
    full = torch.full((num_rows, bitmask.shape[1]), -1, dtype=bitmask.dtype, device=logits.device)
    full.index_copy_(0, index, bitmask)
    xgr.apply_token_bitmask_inplace(logits, full, vocab_size=vocab, indices=index)


def accept_tokens(grammars: list[SequenceGrammar], tokens: list[int]) -> None:
    """Advance each matcher by its sequence's sampled token; one that refuses it records it in `rejected`."""
    if len(grammars) == 1:
        accepted = [grammars[0].matcher.accept_token(tokens[0])]
    else:
        accepted = _xgrammar().BatchGrammarMatcher.batch_accept_token([g.matcher for g in grammars], tokens)
    for grammar, token, ok in zip(grammars, tokens, accepted):
        if not ok:
            grammar.rejected = token


@functools.cache
def _batch_matcher() -> Any:
    return _xgrammar().BatchGrammarMatcher()


class GrammarClock:
    """Seconds constrained sampling spends per phase; a benchmark sets one on Sampler.grammar_clock.

    Each lap synchronizes the device, so the phases are measured apart (and the steps slow down).
    """

    PHASES = ("fill", "copy", "apply", "accept")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self.steps = 0
        self._last = 0.0

    def start(self, device: torch.device) -> None:
        _sync(device)
        self._last = time.perf_counter()

    def lap(self, phase: str, device: torch.device) -> None:
        _sync(device)
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
