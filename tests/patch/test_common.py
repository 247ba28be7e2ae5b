"""The family table, parameter counting and the errors for models outside the table."""

import pytest
import torch
import transformers

import deltakern
from deltakern.patch.families import blocks

from . import models

# (family, blocks, heads, kv heads, head dim, causal blocks, FFN output of block 0)
EXPECTED = {
    "llama": (2, 4, 2, 8, 2, "model.layers.0.mlp.down_proj"),
    "qwen2": (2, 4, 2, 8, 2, "model.layers.0.mlp.down_proj"),
    "mistral": (2, 4, 2, 8, 2, "model.layers.0.mlp.down_proj"),
    "gpt2": (2, 4, 4, 8, 2, "transformer.h.0.mlp.c_proj"),
    "bert": (2, 4, 4, 8, 0, "bert.encoder.layer.0.output.dense"),
    "roberta": (2, 4, 4, 8, 0, "roberta.encoder.layer.0.output.dense"),
    "t5": (4, 4, 4, 8, 2, "encoder.block.0.layer.1.DenseReluDense.wo"),
}


@pytest.mark.parametrize("family", models.FAMILIES)
def test_blocks_resolve_every_family(family):
    model = models.build(family)
    found = blocks(model, "test")
    n, heads, kv_heads, head_dim, causal, ffn_out = EXPECTED[family]
    assert len(found) == n
    assert {(b.num_heads, b.num_kv_heads, b.head_dim) for b in found} == {(heads, kv_heads, head_dim)}
    assert sum(b.causal for b in found) == causal
    assert found[0].ffn_output_name == ffn_out
    for b in found:  # every path names a real module
        for name in (b.attention_output_name, b.ffn_name, b.ffn_output_name):
            model.get_submodule(name)
    if family == "t5":  # decoder blocks keep their FFN at layer.2, behind cross-attention
        assert [b.stack for b in found] == ["encoder", "encoder", "decoder", "decoder"]
        assert found[2].ffn_output_name == "decoder.block.0.layer.2.DenseReluDense.wo"


def test_model_outside_the_families_names_what_was_looked_for():
    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                 num_attention_heads=2, word_embed_proj_dim=16)
    model = transformers.OPTForCausalLM(cfg)
    for add in (lambda m: deltakern.add_prefix(m, 4), lambda m: deltakern.add_adapters(m, 8)):
        with pytest.raises(ValueError, match=r"model_type='opt'.*not a supported family.*looked for llama "
                                             r"\(llama, qwen2, mistral\): blocks .*self_attn"):
            add(model)


def test_trainable_parameters_counts_and_reads_as_a_sentence():
    model = torch.nn.Sequential(torch.nn.Linear(10, 4), torch.nn.Linear(4, 2, bias=False))
    model[0].requires_grad_(False)
    counts = deltakern.trainable_parameters(model)
    assert (counts.trainable, counts.total) == (8, 52)
    assert counts.share == pytest.approx(8 / 52)
    assert str(counts) == "8 of 52 parameters are trainable (15.3846%)"


def test_trainable_parameters_counts_tied_weights_once():
    model = models.build("llama")
    model.lm_head.weight = model.model.embed_tokens.weight
    expected = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert deltakern.trainable_parameters(model).total == expected


# Every add_* with the arguments it is tried with on the second of two models sharing one config.
ADD_METHODS = {
    "add_lora": lambda m: deltakern.add_lora(m, r=2, alpha=4, target_modules="all-linear"),
    "add_lora_nf4": lambda m: deltakern.add_lora(m, r=2, alpha=4, target_modules="all-linear", quantize_base="nf4"),
    "add_prefix": lambda m: deltakern.add_prefix(m, 3),
    "add_adapters": lambda m: deltakern.add_adapters(m, bottleneck=4),
    "add_ia3": lambda m: deltakern.add_ia3(m),
    "add_prompt": lambda m: deltakern.add_prompt(m, 3),
    "add_bitfit": lambda m: deltakern.add_bitfit(m, add_missing_biases=True),
}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "t5"])
@pytest.mark.parametrize("method", ADD_METHODS)
def test_a_model_sharing_the_config_object_is_left_alone(family, method):
    """Two models built from one config object; ``add_*`` on the second leaves the first as it
    was: the same outputs bit for bit, its config unchanged (add_prefix switches the attention
    implementation on a private copy of the config), its parameters untouched; the second runs."""
    cfg = models.config(family)
    model_class = type(models.build(family))  # built by the class itself: from_config would copy cfg
    torch.manual_seed(0)
    first, second = model_class(cfg).eval(), model_class(cfg).eval()
    batch = models.inputs(family)
    with torch.no_grad():
        before = first(**batch).logits
        implementation = cfg._attn_implementation
        ADD_METHODS[method](second)
        assert cfg._attn_implementation == implementation and first.config is cfg
        torch.testing.assert_close(first(**batch).logits, before, rtol=0, atol=0)
        assert all(p.requires_grad for p in first.parameters()), "the first model's parameters were frozen"
        assert second(**batch).logits.isfinite().all()
