"""bench/cpu.py: the medians it reports and issue 12's CPU checks it prints from them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import cpu  # noqa: E402


def test_median_takes_each_field_over_the_rounds():
    runs = [
        {"prefill_s": 0.3, "decode_tok_s": 30.0},
        {"prefill_s": 0.1, "decode_tok_s": 50.0},
        {"prefill_s": 0.2, "decode_tok_s": 10.0},
    ]
    assert cpu.median(runs) == {"prefill_s": 0.2, "decode_tok_s": 30.0}


def test_issue_12_summary_compares_ours_with_llama_cpp_at_batch_1_and_batch_8():
    rows = [
        {"batch": 1, "engine": "sfllm-gguf", "prefill_s": 0.08, "decode_tok_s": 48.0},
        {"batch": 1, "engine": "llama.cpp", "prefill_s": 0.2, "decode_tok_s": 40.0},
        {"batch": 8, "engine": "sfllm-gguf", "prefill_s": 0.5, "decode_tok_s": 150.0},
    ]
    decode, prefill, batch8 = cpu.issue_12_summary(rows)
    assert "1.20x (faster)" in decode
    assert "2.50x as fast (no slower)" in prefill
    assert "3.75x" in batch8 and "MISSES" in batch8
    rows[0]["decode_tok_s"] = 30.0
    assert "SLOWER" in cpu.issue_12_summary(rows)[0]
    assert "needs batch 1" in cpu.issue_12_summary(rows[:1])[0]
