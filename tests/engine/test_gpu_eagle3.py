"""On a GPU: EAGLE-3 drafts with the Triton backend, verify graphs that hand out hidden states, change no token."""

import pytest
import torch
from checkpoints import make_eagle3_checkpoint, make_qwen3_checkpoint, scale_layers

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

COMMON = dict(dtype="float32", device="cuda", kv_cache_memory_gb=0.5, max_num_seqs=16, cuda_graph_max_batch=16)


@pytest.fixture(scope="module")
def target_and_head(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("gpu-eagle3")
    target = scale_layers(make_qwen3_checkpoint(root / "qwen3"), 0.03)
    head = make_eagle3_checkpoint(root / "head", target, mirror=True, num_key_value_heads=4, draft_vocab_size=128)
    return str(target), str(head)


def test_eagle3_with_verify_graphs_gives_the_tokens_of_plain_decoding(target_and_head):
    target, head = target_and_head
    spec_settings = dict(speculative_algorithm="eagle3", speculative_draft_model=head, num_speculative_tokens=3)
    plain = InferenceEngine(model_path=target, attention_backend="triton", **COMMON)
    spec = InferenceEngine(model_path=target, attention_backend="triton", **COMMON, **spec_settings)
    assert spec.runner.verify is not None and spec.runner.verify.graphs and spec.runner.verify.aux_layers
    assert spec.proposer.passes is not None and spec.proposer.passes.graphs
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (19, 5, 33, 12, 1, 27, 8, 40)]
    for params in (
        SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=32, temperature=0.8, top_k=20, seed=5, ignore_eos=True, repetition_penalty=1.1),
    ):
        want, got = plain.generate(prompts, params), spec.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert spec.runner.verify.num_steps > 0 and spec.proposer.passes.num_passes > 0
    assert spec.proposer.num_accepted_tokens > 0
    assert spec.pool.num_used_pages == 0 and not spec.has_work()
    # Against the plain-PyTorch path of the same engine settings, eagerly.
    ref = InferenceEngine(model_path=target, attention_backend="torch", cuda_graphs=False, **COMMON, **spec_settings)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in spec.generate(prompts, params)] == [o.token_ids for o in ref.generate(prompts, params)]
