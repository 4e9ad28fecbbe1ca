"""Dropout is off for sampling and scoring: scored twice in train mode, a policy gives the same log-probs, so the
importance ratio of the first on-policy update is exactly 1 (a model whose config asks for dropout 0.1)."""

import pytest
import torch
from torch import nn

from lit_sapo.models import LoraSettings, ModelSpec, load_policy
from lit_sapo.scoring import completion_logprobs, install_scoring_head


@pytest.fixture(scope="module")
def folder_with_dropout(tmp_path_factory):
    """A tiny Llama folder whose config.json sets attention_dropout 0.1 (read by the attention at forward time)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.1)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("dropout-llama")
    LlamaForCausalLM(config).save_pretrained(out)
    return str(out)


def _scored_twice(policy, vocab: int = 300):
    policy.train()  # the trainer scores old and new log-probs in train mode
    head = install_scoring_head(policy)
    generator = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(0, vocab, (4, 6), generator=generator)
    completion_ids = torch.randint(0, vocab, (4, 8), generator=generator)
    prompt_mask, completion_mask = torch.ones_like(prompt_ids), torch.ones(4, 8)
    with torch.no_grad():
        return [completion_logprobs(policy, head, prompt_ids, prompt_mask, completion_ids, completion_mask)[0]
                for _ in range(2)]


def test_attention_dropout_of_the_config_is_off(folder_with_dropout):
    policy = load_policy(ModelSpec(name=folder_with_dropout, attn_implementation="eager"))
    old, new = _scored_twice(policy)
    assert torch.equal(torch.exp(new - old), torch.ones_like(old))  # r == 1 exactly, not merely close
    assert policy.config.attention_dropout == 0.0


def test_lora_dropout_is_off():
    policy = load_policy(ModelSpec(name="tiny-random-llama", lora=LoraSettings(r=4, dropout=0.1)))
    dropouts = [m for m in policy.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(m.p == 0.0 for m in dropouts)  # peft built its lora_dropout modules, now p = 0
    assert policy.peft_config["default"].lora_dropout == 0.0
    with torch.no_grad():  # LoRA B starts at 0: give the adapters a say, so their dropout would show
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    old, new = _scored_twice(policy, vocab=policy.config.vocab_size)
    assert torch.equal(torch.exp(new - old), torch.ones_like(old))
