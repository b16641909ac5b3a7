"""The OpenAI-compatible HTTP gateway: schema, routing, retries, SSE. It loads no model."""
