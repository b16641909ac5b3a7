"""GatewayConfig from flags and environment, and the API-key check."""

import pytest

from gateway.auth import ApiKeyChecker
from gateway.config import GatewayConfig
from gateway.workers import channel_options


def test_flags_win_over_environment() -> None:
    env = {"SFLLM_GATEWAY_POLICY": "prefix", "SFLLM_GATEWAY_PORT": "9000", "SFLLM_API_KEY": "k1,k2"}
    config = GatewayConfig.from_args(["--workers", "a:1, b:2", "--port", "8100"], env)
    assert config.workers == ["a:1", "b:2"]
    assert config.policy == "prefix" and config.port == 8100
    assert config.api_keys == ["k1", "k2"]
    assert GatewayConfig.from_args(["--workers", "a:1", "--api-key", "x"], env).api_keys == ["x"]


@pytest.mark.parametrize(
    "argv",
    [[], ["--workers", "nohostport"], ["--workers", "a:1", "--max-in-flight", "0"]],
)
def test_bad_settings_exit_with_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        GatewayConfig.from_args(argv, {})
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bad_policy_from_environment_is_refused() -> None:
    with pytest.raises(SystemExit):
        GatewayConfig.from_args(["--workers", "a:1"], {"SFLLM_GATEWAY_POLICY": "random"})


def test_breaker_and_retry_settings_from_flags_and_environment() -> None:
    defaults = GatewayConfig.from_args(["--workers", "a:1"], {})
    assert (defaults.breaker_failure_threshold, defaults.breaker_success_threshold) == (5, 2)  # SGLang's
    assert defaults.breaker_open_timeout_s == 30 and defaults.retry_budget_ratio == 0.2
    env = {"SFLLM_GATEWAY_RETRY_BUDGET_RATIO": "0.5", "SFLLM_GATEWAY_BREAKER_OPEN_TIMEOUT_S": "5"}
    config = GatewayConfig.from_args(["--workers", "a:1", "--breaker-failure-threshold", "3"], env)
    assert (config.breaker_failure_threshold, config.breaker_open_timeout_s, config.retry_budget_ratio) == (3, 5, 0.5)
    bad = [["--breaker-success-threshold", "0"], ["--retry-backoff-cap-s", "0.01"], ["--retry-budget-ratio", "-1"]]
    for flags in bad:
        with pytest.raises(SystemExit):
            GatewayConfig.from_args(["--workers", "a:1", *flags], {})


def test_api_keys() -> None:
    assert ApiKeyChecker([]).allows(None)
    checker = ApiKeyChecker(["secret", "other"])
    assert checker.allows("Bearer secret") and checker.allows("bearer other")
    for header in (None, "", "Bearer", "Bearer wrong", "Basic secret", "secret"):
        assert not checker.allows(header)


def test_keepalive_and_start_timeout_are_flags_and_reach_every_worker_channel() -> None:
    defaults = GatewayConfig.from_args(["--workers", "a:1"], {})
    assert (defaults.keepalive_time_s, defaults.keepalive_timeout_s, defaults.start_timeout_s) == (2.0, 2.0, 60.0)
    env = {"SFLLM_GATEWAY_KEEPALIVE_TIMEOUT_S": "7.5", "SFLLM_GATEWAY_START_TIMEOUT_S": "0"}
    config = GatewayConfig.from_args(["--workers", "a:1", "--keepalive-time-s", "10"], env)
    assert (config.keepalive_time_s, config.keepalive_timeout_s, config.start_timeout_s) == (10.0, 7.5, 0.0)
    options = dict(channel_options(config))
    assert options["grpc.keepalive_time_ms"] == 10_000
    # every ping, keepalive's or flow control's, is given the same time before the connection is closed
    assert options["grpc.keepalive_timeout_ms"] == options["grpc.http2.ping_timeout_ms"] == 7_500
    # workers answer pings more often than one a second with GOAWAY; a start timeout cannot be negative
    for flags in (["--keepalive-time-s", "0.5"], ["--keepalive-timeout-s", "0"], ["--start-timeout-s", "-1"]):
        with pytest.raises(SystemExit):
            GatewayConfig.from_args(["--workers", "a:1", *flags], {})
