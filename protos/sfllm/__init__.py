"""SFLLM protobuf packages."""
