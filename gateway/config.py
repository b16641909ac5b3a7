"""The gateway's one configuration object, built from CLI flags and environment variables in one place."""

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

POLICIES = ("round_robin", "least_load", "power_of_two", "prefix")
ENV_PREFIX = "SFLLM_GATEWAY_"
API_KEY_ENV = "SFLLM_API_KEY"
# The integer settings that must be at least 1; each is also a --flag of the same name.
_COUNTS = (
    "processes",
    "max_in_flight",
    "max_request_bytes",
    "max_attempts",
    "prefix_chunk_chars",
    "prefix_max_chars",
    "breaker_failure_threshold",
    "breaker_success_threshold",
)
# The float settings, each also a --flag of the same name: those that must be > 0, then those that must be >= 0.
_POSITIVE_FLOATS = (
    "health_interval_s",
    "health_timeout_s",
    "load_interval_s",
    "resolve_interval_s",
    "breaker_open_timeout_s",
    "retry_budget_window_s",
    "keepalive_time_s",
    "keepalive_timeout_s",
)
_NON_NEGATIVE_FLOATS = (
    "retry_backoff_base_s",
    "retry_backoff_cap_s",
    "retry_budget_ratio",
    "retry_budget_min_per_s",
    "start_timeout_s",
)


@dataclass
class GatewayConfig:
    """Knobs of the gateway. `workers` entries are host:port; a host may be a DNS name of many addresses."""

    workers: list[str] = field(default_factory=list)
    policy: str = "round_robin"
    host: str = "0.0.0.0"
    port: int = 8000
    processes: int = 1  # gateway processes sharing the port, each with its own router state
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    max_in_flight: int = 1024  # requests the gateway holds at once; past it, 429
    # A request that no worker has started (its first token computed) this long after it arrived gets 429: it waited
    # in full queues, retries or a slow prefill, and its client is better told to come back. 0: no bound.
    start_timeout_s: float = 60.0
    max_request_bytes: int = 8 * 1024 * 1024
    max_attempts: int = 3  # workers tried for one request before its first token
    # Times one streamed completion may move to another worker after part of it reached the client; 0: never.
    max_migrations: int = 2
    health_interval_s: float = 1.0
    health_timeout_s: float = 1.0
    load_interval_s: float = 0.25
    resolve_interval_s: float = 10.0
    # HTTP/2 keepalive on each worker channel: a connection that has received nothing for keepalive_time_s is pinged,
    # and closed (its calls fail over) when that ping, or any other, goes unanswered for keepalive_timeout_s. Their sum
    # bounds how long a stream waits on a silent worker. Workers must permit pings this often (worker/server.py).
    keepalive_time_s: float = 2.0
    keepalive_timeout_s: float = 2.0
    prefix_chunk_chars: int = 64  # granularity of prefix affinity (the gateway has no tokenizer)
    prefix_max_chars: int = 4096  # only this much of a prompt is hashed
    prefix_load_factor: float = 1.5  # a worker may carry this times the mean load before prefix affinity yields
    # Circuit breakers (gateway/resilience.py), one per worker: open after this many consecutive failures,
    # half-open (success_threshold trials at a time) after the timeout, closed after success_threshold successes.
    breaker_failure_threshold: int = 5
    breaker_success_threshold: int = 2
    breaker_open_timeout_s: float = 30.0
    # After a worker failure the next attempt waits uniformly in [0, min(cap, base * 2^(retry-1))].
    retry_backoff_base_s: float = 0.05
    retry_backoff_cap_s: float = 2.0
    # Retries after worker failures, per gateway process: ratio x the requests of the last window, plus min_per_s.
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_s: float = 1.0
    retry_budget_window_s: float = 10.0
    log_level: str = "info"

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not self.workers:
            raise ValueError("workers: at least one host:port is required")
        for entry in self.workers:
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"workers: {entry!r} is not host:port")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}")
        for name in _COUNTS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in _POSITIVE_FLOATS:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in _NON_NEGATIVE_FLOATS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.retry_backoff_cap_s < self.retry_backoff_base_s:
            raise ValueError(f"retry_backoff_cap_s must be >= retry_backoff_base_s ({self.retry_backoff_base_s})")
        if self.prefix_load_factor < 1.0:
            raise ValueError(f"prefix_load_factor must be >= 1, got {self.prefix_load_factor}")
        if self.keepalive_time_s < 1.0:  # workers answer pings more frequent than a second with GOAWAY
            raise ValueError(
                f"keepalive_time_s must be >= 1 (a worker permits a ping a second), got {self.keepalive_time_s}"
            )
        if self.max_migrations < 0:
            raise ValueError(f"max_migrations must be >= 0, got {self.max_migrations}")

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> "GatewayConfig":
        """Flags win over environment variables (SFLLM_GATEWAY_<FLAG>, and SFLLM_API_KEY), which win over defaults."""
        env = os.environ if env is None else env
        defaults = cls()
        parser = argparse.ArgumentParser(
            prog="sfllm-gateway", description="OpenAI-compatible gateway over SFLLM workers"
        )

        def env_or(name: str, default: object) -> object:
            return env.get(ENV_PREFIX + name.upper(), default)

        parser.add_argument("--workers", default=env_or("workers", ""), help="host:port,... (DNS names re-resolved)")
        parser.add_argument("--policy", default=env_or("policy", defaults.policy), choices=POLICIES)
        parser.add_argument("--host", default=env_or("host", defaults.host))
        parser.add_argument("--port", type=int, default=env_or("port", defaults.port))
        parser.add_argument(
            "--api-key", action="append", default=None, help=f"accepted key (repeatable; or {API_KEY_ENV}=k1,k2)"
        )
        for name in _COUNTS:
            parser.add_argument("--" + name.replace("_", "-"), type=int, default=env_or(name, getattr(defaults, name)))
        for name in (*_POSITIVE_FLOATS, *_NON_NEGATIVE_FLOATS, "prefix_load_factor"):
            parser.add_argument(
                "--" + name.replace("_", "-"), type=float, default=env_or(name, getattr(defaults, name))
            )
        parser.add_argument("--max-migrations", type=int, default=env_or("max_migrations", defaults.max_migrations))
        parser.add_argument("--log-level", default=env_or("log_level", defaults.log_level))
        args = parser.parse_args(argv)

        api_keys = args.api_key or [k for k in env.get(API_KEY_ENV, "").split(",") if k]
        config = cls(
            workers=[w.strip() for w in str(args.workers).split(",") if w.strip()],
            policy=args.policy,
            host=args.host,
            port=int(args.port),
            processes=int(args.processes),
            api_keys=api_keys,
            max_in_flight=int(args.max_in_flight),
            max_request_bytes=int(args.max_request_bytes),
            max_attempts=int(args.max_attempts),
            max_migrations=int(args.max_migrations),
            prefix_chunk_chars=int(args.prefix_chunk_chars),
            prefix_max_chars=int(args.prefix_max_chars),
            prefix_load_factor=float(args.prefix_load_factor),
            **{name: int(getattr(args, name)) for name in ("breaker_failure_threshold", "breaker_success_threshold")},
            **{name: float(getattr(args, name)) for name in (*_POSITIVE_FLOATS, *_NON_NEGATIVE_FLOATS)},
            log_level=str(args.log_level),
        )
        try:
            config.validate()
        except ValueError as exc:
            parser.error(str(exc))
        return config
