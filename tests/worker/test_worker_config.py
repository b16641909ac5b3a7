"""WorkerConfig: flags, then SFLLM_* environment variables, then defaults; one place builds the engine's config."""

import pytest

from worker.config import WorkerConfig


def test_defaults_serve_the_packaged_model():
    config = WorkerConfig.from_cli([], env={})
    assert config == WorkerConfig()
    assert config.model is None and config.engine_config().model_path is None


def test_flags_fill_the_config_and_reach_the_engine():
    config = WorkerConfig.from_cli(
        "--model /m --port 7000 --metrics-port 7001 --dtype bfloat16 --max-context-length 2048 "
        "--max-num-seqs 8 --max-waiting 3 --no-prefix-caching --no-cuda-graphs --no-sliding-window-kv "
        "--served-model-name x".split(),
        env={},
    )
    assert (config.model, config.port, config.metrics_port) == ("/m", 7000, 7001)
    engine = config.engine_config()
    assert engine.model_path == "/m" and engine.dtype == "bfloat16" and engine.max_context_length == 2048
    assert engine.max_num_seqs == 8 and engine.max_waiting == 3 and engine.served_model_name == "x"
    assert engine.enable_prefix_caching is False and engine.cuda_graphs is False
    assert engine.sliding_window_kv is False and WorkerConfig().engine_config().sliding_window_kv is True


def test_environment_fills_what_flags_leave_out():
    env = {
        "SFLLM_PORT": "9000",
        "SFLLM_MAX_NUM_SEQS": "4",
        "SFLLM_ENABLE_PREFIX_CACHING": "false",
        "SFLLM_SLIDING_WINDOW_KV": "off",
        "SFLLM_KV_CACHE_MEMORY_GB": "0.5",
        "SFLLM_MODEL": "/env/model",
        "SFLLM_MAX_CONTEXT_LENGTH": "128",
    }
    config = WorkerConfig.from_cli(["--port", "9100"], env=env)
    assert config.port == 9100  # the flag wins
    assert config.max_num_seqs == 4 and config.enable_prefix_caching is False and config.sliding_window_kv is False
    assert config.kv_cache_memory_gb == 0.5 and config.model == "/env/model" and config.max_context_length == 128


def test_a_bad_environment_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        WorkerConfig.from_cli([], env={"SFLLM_PORT": "eighty"})
    assert "SFLLM_PORT" in capsys.readouterr().err
