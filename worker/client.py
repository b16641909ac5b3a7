"""Python clients for a worker's gRPC API: WorkerClient (blocking) and AsyncWorkerClient (asyncio).

with WorkerClient("localhost:50051") as client:
    print(client.generate("The capital of France is", max_tokens=8, temperature=0).text)
"""

import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.sfllm.v1 import worker_pb2 as pb
from protos.sfllm.v1 import worker_pb2_grpc
from protos.sfllm.v1.wire import FINISH_REASON_NAMES

FINISH_REASONS: dict[int, str | None] = {pb.FINISH_REASON_UNSPECIFIED: None, **FINISH_REASON_NAMES}


def build_request(
    prompt: str | None = None,
    *,
    messages: Sequence[Mapping[str, str]] | None = None,
    token_ids: Sequence[int] | None = None,
    request_id: str = "",
    add_special_tokens: bool | None = None,
    continuation: Sequence[int] | None = None,
    **sampling: object,
) -> pb.GenerateRequest:
    """A GenerateRequest from exactly one of prompt / messages / token_ids and sampling fields by name.

    Sampling keywords are the fields of sfllm.v1.SamplingParams (max_tokens, temperature, stop, n, ...);
    ones not given stay unset, so the worker's defaults apply. continuation: output already generated
    for token_ids, which the completion goes on from.
    """
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    request = pb.GenerateRequest(request_id=request_id, sampling=pb.SamplingParams(**sampling))
    if prompt is not None:
        request.text = prompt
    elif messages is not None:
        request.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    else:
        request.token_ids.ids.extend(token_ids or ())
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    if continuation:
        request.continuation.ids.extend(continuation)
    return request


@dataclass
class Choice:
    """One finished completion, assembled from its stream."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop: str | int | None = None  # the matched stop string or stop token id
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    usage: pb.Usage | None = None
    error: str = ""


@dataclass
class Completion:
    """All completions of one Generate call."""

    request_id: str = ""
    num_prompt_tokens: int = 0
    choices: list[Choice] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.choices[0].finish_reason

    def add(self, response: pb.GenerateResponse) -> None:
        """Fold one streamed response into the result."""
        self.request_id = response.request_id
        while len(self.choices) <= response.index:
            self.choices.append(Choice(index=len(self.choices)))
        choice = self.choices[response.index]
        if response.HasField("prompt"):
            self.num_prompt_tokens = response.prompt.num_prompt_tokens
        event = response.WhichOneof("event")
        if event == "delta":
            choice.text += response.delta.text
            choice.token_ids.extend(response.delta.token_ids)
            choice.logprobs.extend(response.delta.logprobs)
        elif event == "finished":
            done = response.finished
            choice.finish_reason = FINISH_REASONS[done.finish_reason]
            kind = done.WhichOneof("matched_stop")
            choice.stop = getattr(done, kind) if kind else None
            choice.usage = done.usage
            choice.error = done.error


class WorkerClient:
    """A blocking client. Leaving a `stream` loop early cancels the call, which aborts the request."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = None) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def stream(
        self, prompt: str | None = None, *, request: pb.GenerateRequest | None = None, **kwargs: object
    ) -> Iterator[pb.GenerateResponse]:
        """Stream GenerateResponses; takes build_request's arguments, or request=GenerateRequest."""
        request = request or build_request(prompt, **kwargs)  # type: ignore[arg-type]
        call = self.stub.Generate(request, timeout=self.timeout)
        try:
            yield from call
        finally:
            call.cancel()  # a no-op once the stream ended; an abort if the caller stopped early

    def generate(self, prompt: str | None = None, **kwargs: object) -> Completion:
        """Run a Generate call to the end and return its completions."""
        completion = Completion()
        for response in self.stream(prompt, **kwargs):
            completion.add(response)
        return completion

    def abort(self, request_ids: Sequence[str]) -> list[str]:
        """Abort in-flight requests by id; returns the ids that were in flight."""
        response = self.stub.Abort(pb.AbortRequest(request_ids=list(request_ids)), timeout=self.timeout)
        return list(response.aborted_request_ids)

    def model_info(self) -> pb.GetModelInfoResponse:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    def load(self) -> pb.GetLoadResponse:
        return self.stub.GetLoad(pb.GetLoadRequest(), timeout=self.timeout)

    def health(self, service: str = "") -> str:
        """The health status name: SERVING, NOT_SERVING, ..."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Poll health until SERVING; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health() == "SERVING":
                    return
            except grpc.RpcError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not SERVING after {timeout}s")
            time.sleep(0.05)


class AsyncWorkerClient:
    """The asyncio client. Breaking out of `stream` (or cancelling the task) aborts the request."""

    def __init__(self, target: str = "localhost:50051", *, timeout: float | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        self.timeout = timeout

    async def __aenter__(self) -> "AsyncWorkerClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def stream(
        self, prompt: str | None = None, *, request: pb.GenerateRequest | None = None, **kwargs: object
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream GenerateResponses; takes build_request's arguments, or request=GenerateRequest."""
        request = request or build_request(prompt, **kwargs)  # type: ignore[arg-type]
        call = self.stub.Generate(request, timeout=self.timeout)
        try:
            async for response in call:
                yield response
        finally:
            call.cancel()

    async def generate(self, prompt: str | None = None, **kwargs: object) -> Completion:
        """Run a Generate call to the end and return its completions."""
        completion = Completion()
        async for response in self.stream(prompt, **kwargs):
            completion.add(response)
        return completion

    async def abort(self, request_ids: Sequence[str]) -> list[str]:
        response = await self.stub.Abort(pb.AbortRequest(request_ids=list(request_ids)), timeout=self.timeout)
        return list(response.aborted_request_ids)

    async def model_info(self) -> pb.GetModelInfoResponse:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    async def load(self) -> pb.GetLoadResponse:
        return await self.stub.GetLoad(pb.GetLoadRequest(), timeout=self.timeout)

    async def health(self, service: str = "") -> str:
        response = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
