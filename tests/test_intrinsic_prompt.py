"""Intrinsic prompt tuning: the MSF auto-encoder reconstructs its training prompts, tuning only z on
a new task of the same family lowers the task loss, the prompt f(z) rides on add_prompt's hooks
(same outputs as add_prompt with f(z) as its embeddings), save writes f(z), and bad input raises.

The "trained prompts" are a synthetic family: P_t = g(c_t) for a fixed random nonlinear map g from
a 3-dimensional code c to [P, D], so a subspace of dimension 4 holds them all. A new task is a
frozen teacher, the same model prompted with g(c_new) for an unseen code; its loss is the mean
squared difference between the student's logits and the teacher's.
"""

import pytest
import torch

import deltakern
from deltakern.intrinsic_prompt import (
    PromptAutoEncoder,
    PromptDecoder,
    add_intrinsic_prompt,
    fit_prompt_autoencoder,
)

from .patch import models

P, D, TASKS, CODE_DIM, INTRINSIC_DIM = 4, 32, 10, 3, 4

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning", "ignore::DeprecationWarning")


def family():
    """g: codes [..., 3] -> prompts [..., P, D], a fixed random two-layer map."""
    g = torch.Generator().manual_seed(0)
    first = torch.randn(CODE_DIM, 16, generator=g)
    second = torch.randn(16, P * D, generator=g) / 4
    return lambda codes: (torch.tanh(codes @ first) @ second).unflatten(-1, (P, D))


@pytest.fixture(scope="module")
def fitted():
    prompt_of = family()
    codes = torch.randn(TASKS, CODE_DIM, generator=torch.Generator().manual_seed(1))
    prompts = prompt_of(codes)
    fit = fit_prompt_autoencoder(prompts, intrinsic_dim=INTRINSIC_DIM, hidden_size=64, steps=500, lr=3e-3, seed=0)
    return prompt_of, prompts, fit


def test_autoencoder_reconstructs_its_training_prompts(fitted):
    _, prompts, fit = fitted
    print(f"\nMSF auto-encoder, {TASKS} prompts [{P}, {D}] through d_I={INTRINSIC_DIM}: reconstruction loss "
          f"{fit.losses[0]:.3f} -> {fit.losses[-1]:.2e}, relative error max {fit.relative_errors.max():.4f} "
          f"mean {fit.relative_errors.mean():.4f}")
    assert fit.relative_errors.shape == (TASKS,)
    assert fit.relative_errors.max() < 0.05
    assert fit.losses[-1] < 1e-3 * fit.losses[0]
    # The reported errors are those of encode -> decode on the prompts.
    with torch.no_grad():
        again = fit.autoencoder.decoder(fit.autoencoder.encode(prompts))
    errors = (again - prompts).flatten(1).norm(dim=1) / prompts.flatten(1).norm(dim=1)
    torch.testing.assert_close(errors, fit.relative_errors)
    # Deterministic given the seed.
    repeat = fit_prompt_autoencoder(prompts, intrinsic_dim=INTRINSIC_DIM, hidden_size=64, steps=5, lr=3e-3, seed=0)
    assert repeat.losses == fit.losses[:5]


def test_tuning_only_z_lowers_a_new_tasks_loss(fitted):
    prompt_of, prompts, fit = fitted
    new_prompt = prompt_of(torch.randn(CODE_DIM, generator=torch.Generator().manual_seed(7)))
    teacher = deltakern.add_prompt(models.build("llama"), P, init=new_prompt)
    batch = models.inputs("llama")
    with torch.no_grad():
        target = teacher(**batch).logits
    start = fit.autoencoder.encode(prompts).mean(0).detach()
    student = add_intrinsic_prompt(models.build("llama"), fit.autoencoder, z_init=start)
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable == {"deltakern_prompt.z"}
    frozen = {name: p.detach().clone() for name, p in student.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.Adam([student.deltakern_prompt.z], lr=0.05)
    losses = []
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(student(**batch).logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"\nIST, tuning {INTRINSIC_DIM} numbers against a teacher prompted from the same family: loss "
          f"{losses[0]:.2e} -> {losses[-1]:.2e}")
    assert losses[-1] < 0.2 * losses[0]
    for name, p in student.named_parameters():
        if name != "deltakern_prompt.z":
            assert torch.equal(p, frozen[name]), name  # the base and the decoder never move
    # The caller's auto-encoder is not the model's (frozen) copy and still trains.
    assert all(p.requires_grad for p in fit.autoencoder.parameters())


def test_intrinsic_prompt_runs_as_add_prompt_with_f_of_z_and_saves_f_of_z(fitted, tmp_path):
    _, _, fit = fitted
    z = torch.randn(INTRINSIC_DIM, generator=torch.Generator().manual_seed(3))
    model = add_intrinsic_prompt(models.build("llama"), fit.autoencoder, z_init=z)
    with torch.no_grad():
        decoded = fit.autoencoder.decoder(z)
    torch.testing.assert_close(model.deltakern_prompt.prompts(), decoded, atol=0, rtol=0)
    plain = deltakern.add_prompt(models.build("llama"), P, init=decoded)
    batch = models.inputs("llama")
    with torch.no_grad():
        expected = plain(**batch).logits
        torch.testing.assert_close(model(**batch).logits, expected, atol=0, rtol=0)
        deltakern.save(model, tmp_path)
        loaded = deltakern.load(models.build("llama"), tmp_path)
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=0, rtol=0)
        # What save wrote is a plain PROMPT_TUNING checkpoint PEFT reads.
        from peft import PeftModel

        peft = PeftModel.from_pretrained(models.build("llama"), tmp_path).eval()
        assert peft.peft_config["default"].peft_type == "PROMPT_TUNING"
        torch.testing.assert_close(peft(**batch).logits, expected, atol=2e-5, rtol=2e-5)
    # T5: the unused second half of PEFT's seq2seq layout repeats f(z); the encoder input is prompted.
    t5 = add_intrinsic_prompt(models.build("t5"), fit.autoencoder, z_init=z)
    plain_t5 = deltakern.add_prompt(models.build("t5"), P, init=decoded)
    t5_batch = models.inputs("t5")
    with torch.no_grad():
        assert t5.deltakern_prompt().shape == (2 * P, D)
        torch.testing.assert_close(t5(**t5_batch).logits, plain_t5(**t5_batch).logits, atol=0, rtol=0)
    with pytest.raises(NotImplementedError, match=r"fold_prompt_encoder: the prompt of LlamaForCausalLM "
                                                  r"\(IntrinsicPromptEncoder\) is not folded in place"):
        deltakern.fold_prompt_encoder(model)


def test_bad_input(fitted):
    _, prompts, fit = fitted
    caller = "fit_prompt_autoencoder"
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf"{caller}: intrinsic_dim must be an int >= 1, got {bad!r}"):
            fit_prompt_autoencoder(prompts, intrinsic_dim=bad)
    with pytest.raises(ValueError, match=rf"{caller}: prompts must be a floating tensor \[tasks, num_virtual_tokens, "
                                         r"embedding width\] with every size >= 1, got \(10, 128\)"):
        fit_prompt_autoencoder(prompts.flatten(1))
    with pytest.raises(ValueError, match=r"got \(0, 4, 32\)"):
        fit_prompt_autoencoder(prompts[:0])
    with pytest.raises(ValueError, match=f"{caller}: steps must be an int >= 1, got 0"):
        fit_prompt_autoencoder(prompts, steps=0)
    with pytest.raises(ValueError, match=f"{caller}: lr must be a positive number, got 0"):
        fit_prompt_autoencoder(prompts, lr=0)
    # A decoder of width 32 on a model of another width: nothing is attached.
    wide = models.build("llama", hidden_size=64)
    with pytest.raises(ValueError, match="add_intrinsic_prompt: the decoder makes prompts of width 32, the model's "
                                         "input embeddings have width 64"):
        add_intrinsic_prompt(wide, fit.autoencoder)
    assert not hasattr(wide, "deltakern_prompt")
    with pytest.raises(ValueError, match=r"add_intrinsic_prompt: z_init must be a floating tensor of shape "
                                         r"\(intrinsic_dim,\) = \(4,\), got torch.float32 of shape \(5,\)"):
        add_intrinsic_prompt(models.build("llama"), fit.autoencoder, z_init=torch.zeros(5))
    with pytest.raises(ValueError, match="add_intrinsic_prompt: decoder must be a PromptDecoder or PromptAutoEncoder"):
        add_intrinsic_prompt(models.build("llama"), torch.nn.Linear(4, P * D))
    model = add_intrinsic_prompt(models.build("llama"), PromptDecoder(P, D, 2, 8))
    assert model.deltakern_prompt.z.shape == (2,) and not model.deltakern_prompt.z.any()
    with pytest.raises(ValueError, match="add_intrinsic_prompt: LlamaForCausalLM already has a deltakern prompt"):
        add_intrinsic_prompt(model, PromptAutoEncoder(P, D, 2, 8))
    with pytest.raises(ValueError, match="add_prompt: LlamaForCausalLM already has a deltakern prompt"):
        deltakern.add_prompt(model, P)
