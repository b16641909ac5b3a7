"""The gRPC worker: serves one sfllm_core engine over sfllm.v1.Worker, with health, reflection and metrics."""
