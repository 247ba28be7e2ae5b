"""PrefixEncoder against PEFT's prefix-tuning encoder and past_key_values layout."""

import pytest
import torch
from peft import PrefixTuningConfig
from peft.tuners.prefix_tuning.model import PrefixEncoder as PeftPrefixEncoder

from deltakern.nn import PrefixEncoder

LAYERS, HKV, D, P, B = 3, 2, 8, 5, 2


def peft_layer_prefixes(peft_encoder):
    """PEFT's get_prompt: encoder output viewed as past_key_values, one (k, v) per layer."""
    tokens = torch.arange(P).unsqueeze(0).expand(B, -1)
    flat = peft_encoder(tokens).view(B, P, LAYERS * 2, HKV, D)
    pairs = flat.permute([2, 0, 3, 1, 4]).split(2)
    return [(pair[0], pair[1]) for pair in pairs]  # each [B, Hkv, P, D]


@pytest.mark.parametrize("projection_hidden", [None, 16], ids=["direct", "projection"])
def test_same_prefixes_as_peft(projection_hidden):
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, token_dim=HKV * D, num_attention_heads=HKV,
        num_layers=LAYERS, encoder_hidden_size=projection_hidden or 1, prefix_projection=projection_hidden is not None,
    )
    theirs = PeftPrefixEncoder(config)
    ours = PrefixEncoder(LAYERS, HKV, D, P, projection_hidden=projection_hidden)
    ours.load_state_dict(theirs.state_dict())
    # Exact for the direct form; the projection's GEMMs run on [P, ...] here and on [B, P, ...] in
    # PEFT, which may round differently in the last bit.
    tol = 0.0 if projection_hidden is None else 1e-6
    for (k, v), (pk, pv) in zip(ours(), peft_layer_prefixes(theirs)):
        assert k.shape == (HKV, P, D)
        torch.testing.assert_close(k.expand(B, -1, -1, -1), pk, atol=tol, rtol=tol)
        torch.testing.assert_close(v.expand(B, -1, -1, -1), pv, atol=tol, rtol=tol)


def test_prompt_embeddings_map_onto_the_direct_form():
    prompt_embeddings = torch.randn(P, LAYERS * 2 * HKV * D)
    encoder = PrefixEncoder(LAYERS, HKV, D, P)
    encoder.load_prompt_embeddings(prompt_embeddings)
    layer = 1
    k, v = encoder()[layer]
    width = HKV * D
    torch.testing.assert_close(k, prompt_embeddings[:, 2 * layer * width:(2 * layer + 1) * width].view(P, HKV, D).transpose(0, 1))
    torch.testing.assert_close(v, prompt_embeddings[:, (2 * layer + 1) * width:(2 * layer + 2) * width].view(P, HKV, D).transpose(0, 1))


def test_gradients_reach_the_embedding():
    encoder = PrefixEncoder(LAYERS, HKV, D, P, projection_hidden=16)
    loss = sum((k * 2 + v).sum() for k, v in encoder())
    loss.backward()
    assert encoder.embedding.weight.grad.abs().sum() > 0
    assert encoder.transform[0].weight.grad.abs().sum() > 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_kv_heads must be an int >= 1"):
        PrefixEncoder(2, 0, 8, 4)
    with pytest.raises(ValueError, match=r"prompt_embeddings must be \(4, 64\)"):
        PrefixEncoder(2, 2, 8, 4).load_prompt_embeddings(torch.zeros(4, 63))
    with pytest.raises(NotImplementedError, match="projected prefixes"):
        PrefixEncoder(2, 2, 8, 4, projection_hidden=4).load_prompt_embeddings(torch.zeros(4, 64))
