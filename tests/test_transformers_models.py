"""LoRA on transformers text models as tutorials use them, built from small configs (no downloads)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import convlora
from convlora.testing import randomize_lora_, relative_error

SMALL = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=37, max_position_embeddings=64)


def roberta():
    return tf.RobertaModel(tf.RobertaConfig(num_hidden_layers=2, **SMALL)), ["query", "value"]


def distilbert():
    cfg = tf.DistilBertConfig(vocab_size=100, dim=32, n_heads=4, hidden_dim=37, n_layers=2, max_position_embeddings=64)
    return tf.DistilBertModel(cfg), ["q_lin", "v_lin"]


def gpt2():
    cfg = tf.GPT2Config(vocab_size=100, n_embd=32, n_head=4, n_layer=2, n_positions=64)
    return tf.GPT2Model(cfg), ["c_attn"]


def clip_text():
    cfg = tf.CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            max_position_embeddings=64, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return tf.CLIPTextModel(cfg), ["q_proj", "v_proj"]


@pytest.mark.parametrize("build", [roberta, distilbert, gpt2, clip_text], ids=lambda f: f.__name__)
def test_transformers_model_lora_merges_exactly(build):
    torch.manual_seed(0)
    model, targets = build()
    model.eval()
    ids = torch.randint(3, 100, (2, 12))
    base = model(input_ids=ids).last_hidden_state

    model.train()
    names = convlora.inject_lora(model, convlora.LoRAConfig(r=4, alpha=8, target_modules=targets))
    assert len(names) == 2 * len(targets)
    convlora.mark_only_lora_as_trainable(model)
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())
    # The transformer's own dropout differs between train and eval, so compare in eval mode, with
    # merging switched off first: B = 0 must give exactly the base.
    for layer in convlora.lora_layers(model).values():
        layer.merge_weights = False
    model.eval()
    assert torch.equal(model(input_ids=ids).last_hidden_state, base)

    randomize_lora_(model, seed=1, std=0.2)
    unmerged = model(input_ids=ids).last_hidden_state
    assert relative_error(unmerged, base) > 1e-3
    for layer in convlora.lora_layers(model).values():
        layer.merge_weights = True
    model.eval()  # now merges
    assert all(layer.merged for layer in convlora.lora_layers(model).values())
    assert relative_error(model(input_ids=ids).last_hidden_state, unmerged) < 1e-5
    merged_model = convlora.merge_and_unload(model)
    assert not convlora.lora_layers(merged_model)
    assert relative_error(merged_model(input_ids=ids).last_hidden_state, unmerged) < 1e-5


def test_gpt2_c_attn_is_a_gpt2conv1d_lora_layer():
    model, _ = gpt2()
    convlora.inject_lora(model, convlora.LoRAConfig(r=2, target_modules=["c_attn"]))
    layer = model.h[0].attn.c_attn
    assert isinstance(layer, convlora.GPT2Conv1D) and isinstance(layer, tf.pytorch_utils.Conv1D)
    assert layer.weight.shape == (32, 96) and layer.lora_A.shape == (2, 32) and layer.lora_B.shape == (96, 2)
