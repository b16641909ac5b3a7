"""sfllm.v1: the worker API (worker.proto) and its generated stubs."""
