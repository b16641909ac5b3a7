"""Conventions of the Worker API beyond its messages: trailing-metadata keys and finish-reason names.

Both sides of the API (the worker and its callers: the gateway, worker/client.py) import them from
here, so the names cannot drift apart.
"""

from protos.sfllm.v1 import worker_pb2 as pb

# Trailing metadata of an INVALID_ARGUMENT: the offending field's name.
ERROR_PARAM_KEY = "sfllm-error-param"
# Trailing metadata of a RESOURCE_EXHAUSTED that means "queue full": a suggested wait in milliseconds.
# Its absence marks a message-size error, the caller's fault.
RETRY_AFTER_KEY = "retry-after-ms"
# Trailing metadata of an UNAVAILABLE that means "draining": the worker refuses new calls for good; send them
# elsewhere, and hold it no failure (it is being shut down on purpose).
DRAINING_KEY = "sfllm-draining"
# Finished.error of a FINISH_REASON_ABORT that a drain forced (its time ran out): the worker did not fail the
# request, so a caller may resume it on another worker. Other aborts (Abort, a cancelled call) have no error.
DRAINED_ERROR = "worker drained"

# FinishReason values by the names the engine and the OpenAI API use, and back.
FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}
FINISH_REASON_NAMES = {value: name for name, value in FINISH_REASONS.items()}

# SamplingParams fields with explicit presence (proto3 optional) that callers copy as they are when set
# and otherwise leave unset, so the worker applies its own defaults.
OPTIONAL_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
