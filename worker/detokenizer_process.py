"""DetokenizerProcess: the worker's text process, between the engine process and the gRPC front.

It reads StepBatches (one per engine step), turns each request's new tokens into text
(incremental detokenization, stop strings, the text of logprob tokens, the prompt's included) and
sends the front one TextBatch per read. When it falls behind it reads every batch waiting and
merges them, so a request's output grows per message instead of the queue growing.
"""

import logging
import os
import sys
from typing import Any

import zmq
from tokenizers import Tokenizer

from protos.sfllm.logs import configure_logging
from sfllm_core.outputs import StepOutput, TokenLogprob
from worker.children import child_args, die_with_parent, settle_heap
from worker.detokenizer import IncrementalDetokenizer
from worker.messages import Channels, DetokParams, DetokReady, StepBatch, TextBatch, TextLogprob, TextOutput, decoder
from worker.messages import encoder as make_encoder
from worker.stop_strings import StopStringMatcher

log = logging.getLogger("sfllm.detokenizer")


def main(argv: list[str] | None = None) -> None:
    """`python -m worker.detokenizer_process ARGS`: the detokenizer process, started by the worker's front.

    It reads the front's own tokenizer, saved as one tokenizer.json, with tokenizers alone: no
    transformers or torch to import, so it is up in about a second.
    """
    args = child_args(argv)
    die_with_parent(args["parent_pid"])
    configure_logging(args["log_level"])
    try:
        tokenizer = Tokenizer.from_file(args["tokenizer_file"])
    except Exception:
        log.exception("the detokenizer could not load the tokenizer")
        sys.exit(1)
    DetokenizerProcess(tokenizer, Channels(**args["channels"]), args["parent_pid"]).run()


class _RequestText:
    """One request's text state: its detokenizer and stop strings."""

    __slots__ = ("detok", "stop")

    def __init__(self, tokenizer: Any, params: DetokParams) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, params.skip_special_tokens)
        self.stop = StopStringMatcher(params.stops) if params.stops else None
        # A continued request: replay the earlier output so that both states stand where the first
        # worker's did (text it held back, a stop string's start or part of a character, is held
        # again); what the replay emits was sent by that worker already.
        for token_id in params.continuation:
            text = self.detok.push(token_id)
            if self.stop is not None:
                self.stop.push(text)


class DetokenizerProcess:
    """Text for every request in flight, keyed by engine request id."""

    def __init__(self, tokenizer: Tokenizer, channels: Channels, parent_pid: int) -> None:
        self.tokenizer = tokenizer
        self.parent_pid = parent_pid
        self._ctx = zmq.Context()
        self.inbox = self._ctx.socket(zmq.PULL)
        self.inbox.setsockopt(zmq.RCVHWM, 0)
        self.inbox.bind(channels.detokenizer)
        self.to_front = self._ctx.socket(zmq.PUSH)
        self.to_front.setsockopt(zmq.SNDHWM, 0)
        self.to_front.setsockopt(zmq.LINGER, 2000)
        self.to_front.connect(channels.front)
        self._encode = make_encoder().encode
        self._decode = decoder(StepBatch).decode
        self.requests: dict[str, _RequestText] = {}
        self._token_text: dict[int, str] = {}

    def run(self) -> None:
        settle_heap("detokenizer")
        self.to_front.send(self._encode(DetokReady()))
        try:
            while True:
                if not self.inbox.poll(1000):
                    if os.getppid() != self.parent_pid:
                        return
                    continue
                merged: dict[str, TextOutput] = {}
                while True:
                    try:
                        frame = self.inbox.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.process(self._decode(frame), merged)
                if merged:
                    self.to_front.send(self._encode(TextBatch(list(merged.values()))))
        finally:
            self.inbox.close()
            self.to_front.close()
            self._ctx.term()

    def process(self, batch: StepBatch, merged: dict[str, TextOutput]) -> None:
        """Fold one engine step into `merged` (one TextOutput per request, in order of first appearance)."""
        for rid, params in batch.announce:
            self.requests[rid] = _RequestText(self.tokenizer, params)
        for out in batch.outputs:
            state = self.requests.get(out.request_id)
            if state is None:  # ended here already (a stop string); the engine's own end follows
                continue
            item = self._text(state, out)
            if out.prompt_logprobs is not None:
                item.prompt_logprobs = [self._logprob(lp) for lp in out.prompt_logprobs]
            if item.finished:
                del self.requests[out.request_id]
            earlier = merged.get(out.request_id)
            if earlier is None:
                merged[out.request_id] = item
            else:
                earlier.token_ids += item.token_ids
                earlier.text += item.text
                if item.logprobs:
                    earlier.logprobs = (earlier.logprobs or []) + item.logprobs
                earlier.num_cached_tokens = item.num_cached_tokens
                earlier.num_accepted_draft_tokens = item.num_accepted_draft_tokens
                if item.prompt_logprobs is not None:
                    earlier.prompt_logprobs = item.prompt_logprobs
                if item.finished:
                    earlier.finished, earlier.finish_reason = True, item.finish_reason
                    earlier.stop_string, earlier.stop_token_id = item.stop_string, item.stop_token_id
                    earlier.error, earlier.abort_engine = item.error, item.abort_engine

    def _text(self, state: _RequestText, out: StepOutput) -> TextOutput:
        detok, stop = state.detok, state.stop
        token_ids: list[int] = []
        parts: list[str] = []
        logprobs: list[TextLogprob] | None = [] if out.logprobs else None
        for k, token_id in enumerate(out.token_ids):
            token_ids.append(token_id)
            if logprobs is not None:
                logprobs.append(self._logprob(out.logprobs[k]))
            text = detok.push(token_id)
            if stop is None:
                parts.append(text)
                continue
            parts.append(stop.push(text))
            if stop.matched is not None:  # later tokens of this step belong after the stop: drop them
                return TextOutput(
                    out.request_id,
                    token_ids,
                    "".join(parts),
                    logprobs,
                    out.num_cached_tokens,
                    finished=True,
                    finish_reason="stop",
                    stop_string=stop.matched,
                    abort_engine=not out.finished,
                    num_accepted_draft_tokens=out.num_accepted_draft_tokens,
                )
        item = TextOutput(
            out.request_id,
            token_ids,
            "".join(parts),
            logprobs,
            out.num_cached_tokens,
            num_accepted_draft_tokens=out.num_accepted_draft_tokens,
        )
        if out.finished and out.finish_reason in ("abort", "error"):
            # Cut short, not ended: text held back stays back (a router continuing the completion
            # elsewhere generates those tokens again, and their text is then sent once).
            item.finished, item.finish_reason, item.error = True, out.finish_reason, out.error
        elif out.finished:
            tail = detok.flush()
            if stop is not None:
                tail = stop.push(tail)
                if stop.matched is not None:
                    item.text += tail
                    item.finished, item.finish_reason, item.stop_string = True, "stop", stop.matched
                    return item
                tail += stop.flush()
            item.text += tail
            item.finished, item.finish_reason = True, out.finish_reason or "stop"
            item.stop_token_id, item.error = out.stop_token_id, out.error
        return item

    def _logprob(self, lp: TokenLogprob) -> TextLogprob:
        token = self._decode_one
        return TextLogprob(lp.token_id, token(lp.token_id), lp.logprob, [(t, token(t), v) for t, v in lp.top])

    def _decode_one(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text


if __name__ == "__main__":
    main()
