"""``add_prompt``: prompt tuning (Lester et al.) and P-tuning v1 as trainable virtual input tokens.

How a prompted model runs
-------------------------
- ``model.deltakern_prompt`` is one :class:`PromptEncoder`. Its ``embedding`` holds ``S·P`` rows of
  width ``D`` (the model's embedding width); the first ``P`` are the virtual tokens. ``S`` is 2 for
  encoder-decoder models and 1 otherwise: PEFT's ``SEQ_2_SEQ_LM`` prompt has a second half it never
  uses for prompt tuning or P-tuning, kept here so checkpoints and P-tuning's LSTM (which runs over
  all ``S·P`` rows) agree with PEFT. Intrinsic prompt tuning
  (``deltakern.intrinsic_prompt.add_intrinsic_prompt``) installs an ``IntrinsicPromptEncoder``
  instead, through the same :func:`install_prompt` and hooks.
- A forward pre-hook rewrites the call before the model sees it, as PEFT's forward does:
  ``inputs_embeds = [prompt; embed(input_ids)]`` (``[B, P + L, D]``), ``attention_mask`` gets ``P``
  leading ones, ``token_type_ids`` ``P`` leading zeros, token-level ``labels`` (causal LM, masked
  LM, token classification) ``P`` leading ``-100``. Outputs therefore cover ``P + L`` positions.
- Positions are counted over ``[virtual tokens; input]``, padding included: PEFT passes
  ``inputs_embeds`` and drops ``position_ids``, so the model numbers positions itself. The hook
  drops ``position_ids`` too (``generate()``'s pad-aware ones included), so a left-padded row has
  its real tokens at ``P + pad + i``, in the forward and in ``generate()`` alike, exactly as PEFT.
- ``generate()``: the prompt goes in only when the cache is empty (the first step); later steps get
  the new token alone, and their mask ``P`` leading ones for the cached virtual tokens.
- T5 (encoder-decoder): the prompt goes before the encoder input only, as PEFT does; the hook sits
  on the encoder stack (``generate()`` runs it on its own), and a hook on the model extends the
  mask the decoder's cross-attention uses. Decoder inputs and labels are unchanged.
- A prompt on its own (PPT's pre-trained prompt): :func:`save_prompt` writes the ``[P, D]`` virtual
  tokens to one safetensors file, :func:`load_prompt` reads it, ``add_prompt(..., init=path)`` starts
  from it.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable

import torch
from torch import nn

from ..nn import PromptEncoder
from ..nn.prompt import ENCODERS, VirtualTokens
from ..registry import E2EProviders, MethodSpec, PeftFormat, register_method
from .common import (freeze_base, load_base_model_tensors, peft_config_fields, peft_task_type, prompt_weight_dtype,
                     task_head_checkpoint)

PROMPT_ATTRIBUTE = "deltakern_prompt"
# Model classes whose labels have one entry per input token (and so get -100 on virtual tokens).
_TOKEN_LABELS = ("ForCausalLM", "LMHeadModel", "ForMaskedLM", "ForTokenClassification")


def _input_embeddings(model: nn.Module, caller: str) -> nn.Embedding:
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = None
    if getter is not None:
        try:
            embeddings = getter()
        except NotImplementedError:
            embeddings = None
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(
            f"{caller}: {type(model).__name__} has no input embeddings (get_input_embeddings() must return an "
            f"nn.Embedding, got {type(embeddings).__name__}); virtual tokens are prepended to them"
        )
    return embeddings


def _keyword_hook(model_forward, rewrite):
    """A forward pre-hook (with kwargs) that names positional arguments, then calls ``rewrite(kwargs)``.
    Hooks here are partials of module functions, not closures, so that a prompted model pickles
    whole (``torch.save(model)``, ``copy.deepcopy``)."""
    names = tuple(p.name for p in inspect.signature(model_forward).parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return functools.partial(_keyword_pre_hook, names, rewrite)


def _keyword_pre_hook(names: tuple[str, ...], rewrite, module, args, kwargs):
    kwargs = {**dict(zip(names, args)), **kwargs}
    rewrite(kwargs)
    return (), kwargs


def _extend_mask(kwargs: dict, num_virtual_tokens: int, caller: str) -> None:
    mask = kwargs.get("attention_mask")
    if mask is None:
        return
    if mask.dim() != 2:
        raise NotImplementedError(f"{caller}: only [B, L] attention masks are supported with a prompt, got shape {tuple(mask.shape)}")
    ones = torch.ones(mask.shape[0], num_virtual_tokens, dtype=mask.dtype, device=mask.device)
    kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)


def _prepend(kwargs: dict, prompt: VirtualTokens, embeddings: nn.Embedding, token_labels: bool) -> None:
    """Replace ``input_ids`` by ``inputs_embeds = [prompt; embed(input_ids)]`` and pad the per-token inputs."""
    num_virtual_tokens = prompt.num_virtual_tokens
    input_ids = kwargs.pop("input_ids", None)
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        embeds = embeddings(input_ids)
    batch = embeds.shape[0]
    # Expanded before the cast: backward then sums the batch's gradients in the prompt's own dtype
    # (fp32 over a bf16 model, as PEFT, whose embedding lookup of [B, P] token ids sums in fp32).
    virtual = prompt.prompts().unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
    token_types = kwargs.get("token_type_ids")
    if token_types is not None:
        kwargs["token_type_ids"] = torch.cat([token_types.new_zeros(batch, num_virtual_tokens), token_types], dim=1)
    labels = kwargs.get("labels")
    if token_labels and labels is not None:
        kwargs["labels"] = torch.cat([labels.new_full((batch, num_virtual_tokens), -100), labels], dim=1)


def _rewrite_single_stack(prompt: VirtualTokens, embeddings: nn.Embedding, token_labels: bool, caller: str,
                          kwargs: dict) -> None:
    """Decoder-only and encoder-only models: prompt on the first step, mask always."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or cache.get_seq_length() == 0:
        _prepend(kwargs, prompt, embeddings, token_labels)
    _extend_mask(kwargs, prompt.num_virtual_tokens, caller)
    # The model numbers positions over [virtual; input] itself, as under PEFT (see the module docstring).
    kwargs.pop("position_ids", None)


def _rewrite_encoder(prompt: VirtualTokens, embeddings: nn.Embedding, caller: str, kwargs: dict) -> None:
    """The encoder stack of an encoder-decoder model: always prompted. Its mask is already extended
    when the model's own hook ran first (length P + L) and not when generate() calls the encoder
    directly (length L)."""
    source = kwargs.get("input_ids") if kwargs.get("inputs_embeds") is None else kwargs["inputs_embeds"]
    mask = kwargs.get("attention_mask")
    _prepend(kwargs, prompt, embeddings, token_labels=False)
    if mask is not None and mask.shape[-1] == source.shape[1]:
        _extend_mask(kwargs, prompt.num_virtual_tokens, caller)


def _extend_model_mask(prompt: VirtualTokens, caller: str, kwargs: dict) -> None:
    """The encoder-decoder model's own hook: the mask it passes on covers [virtual; input]."""
    _extend_mask(kwargs, prompt.num_virtual_tokens, caller)


def _check_count(name: str, value, caller: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{caller}: {name} must be an int >= 1, got {value!r}")


def _init_ids(init: str, total: int, vocab_size: int, tokenizer, device, caller: str) -> torch.Tensor | None:
    """The vocabulary ids whose embeddings initialise the ``total`` rows, or None for random rows."""
    if init == "random":
        return None
    if init == "vocab":
        return torch.randint(0, vocab_size, (total,), device=device)
    if tokenizer is None:
        raise ValueError(f"{caller}: init={init!r} is a text to initialise from and needs tokenizer=, got tokenizer=None")
    ids = list(tokenizer(init)["input_ids"])
    if not ids:
        raise ValueError(f"{caller}: init text {init!r} gives no tokens")
    if max(ids) >= vocab_size or min(ids) < 0:
        raise ValueError(f"{caller}: init text {init!r} gives token ids {ids} outside the model's vocabulary of {vocab_size}")
    # PEFT's TEXT init: the token ids repeated to fill, then cut to the number of rows.
    ids = (ids * -(-total // len(ids)))[:total]
    return torch.tensor(ids, device=device)


def install_prompt(model: nn.Module, make_prompt: Callable[[int, int], VirtualTokens], caller: str) -> VirtualTokens:
    """Put the virtual tokens ``make_prompt(D, S)`` before the input of ``model`` (``D`` its
    embedding width, ``S`` 2 for encoder-decoder models, else 1): register them as
    ``model.deltakern_prompt`` (on the embeddings' device, in their dtype or float32 over a float16 or
    bfloat16 model: :func:`~deltakern.patch.common.prompt_weight_dtype`), add the pre-hooks of the
    module docstring, freeze the base, and return them. Every kind of prompt (``add_prompt``,
    ``deltakern.intrinsic_prompt.add_intrinsic_prompt``) goes through here.

    Raises:
        ValueError: no input embeddings, or a prompt already present.
        NotImplementedError: question answering models (their start/end positions would shift).
    """
    embeddings = _input_embeddings(model, caller)
    name = type(model).__name__
    if name.endswith("ForQuestionAnswering"):
        raise NotImplementedError(f"{caller}: {name} takes start/end positions that virtual tokens would shift; "
                                  f"not supported")
    if has_prompt(model):
        raise ValueError(f"{caller}: {name} already has a deltakern prompt")
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    prompt = make_prompt(embeddings.embedding_dim, 2 if encoder_decoder else 1)
    prompt.to(device=embeddings.weight.device, dtype=prompt_weight_dtype(embeddings.weight.dtype))
    model.add_module(PROMPT_ATTRIBUTE, prompt)
    if encoder_decoder:
        stack = model.get_encoder()
        stack.register_forward_pre_hook(_keyword_hook(stack.forward, functools.partial(_rewrite_encoder, prompt, embeddings, caller)),
                                        with_kwargs=True)
        model.register_forward_pre_hook(
            _keyword_hook(model.forward, functools.partial(_extend_model_mask, prompt, caller)),
            with_kwargs=True)
    else:
        rewrite = functools.partial(_rewrite_single_stack, prompt, embeddings, name.endswith(_TOKEN_LABELS), caller)
        model.register_forward_pre_hook(_keyword_hook(model.forward, rewrite), with_kwargs=True)
    freeze_base(model)
    return prompt


def _attach(model: nn.Module, num_virtual_tokens: int, encoder: str | None, encoder_hidden_size: int | None,
            encoder_num_layers: int, caller: str) -> PromptEncoder:

    _check_count("num_virtual_tokens", num_virtual_tokens, caller)
    if encoder is not None and encoder not in ENCODERS:
        raise ValueError(f"{caller}: encoder must be None, 'lstm' or 'mlp', got {encoder!r}")
    if encoder_hidden_size is not None:
        if encoder is None:
            raise ValueError(f"{caller}: encoder_hidden_size={encoder_hidden_size!r} needs encoder='lstm' or 'mlp', got encoder=None")
        _check_count("encoder_hidden_size", encoder_hidden_size, caller)
    return install_prompt(
        model, lambda token_dim, num_submodules: PromptEncoder(num_virtual_tokens, token_dim, num_submodules, encoder,
                                                               encoder_hidden_size, encoder_num_layers), caller)


def add_prompt(model: nn.Module, num_virtual_tokens: int, init: str | os.PathLike | torch.Tensor = "random",
               tokenizer=None, encoder: str | None = None, encoder_hidden_size: int | None = None) -> nn.Module:
    """Add prompt tuning (or, with ``encoder``, P-tuning v1) to a Hugging Face ``model`` in place and return it.

    ``num_virtual_tokens`` (P) trainable embeddings ``[P, D]`` go before the input embeddings
    (before the encoder input for T5); ``model(**batch)`` and ``model.generate(**batch)`` work
    unchanged and their outputs cover ``P + L`` positions (see the module docstring; the semantics
    are PEFT's). The base model is frozen.

    Args:
        init: ``"random"`` (``nn.Embedding``'s N(0, 1), PEFT's RANDOM), ``"vocab"`` (rows of randomly
            drawn vocabulary embeddings), a saved prompt (a tensor ``[P, D]``, or a file written by
            :func:`save_prompt`: an ``os.PathLike`` or a string ending in ``.safetensors``; e.g. a
            PPT pre-trained prompt) copied into the P virtual tokens (bit for bit when its dtype is
            the model's; cast otherwise), or any other string: a
            text whose token embeddings, repeated or cut to length, initialise the rows (e.g. a
            label word; needs ``tokenizer``). For T5 a saved prompt fills the P rows the model reads;
            the unused second half of PEFT's layout stays random.
        encoder: ``None`` (prompt tuning), ``"lstm"`` or ``"mlp"`` (P-tuning's reparameterisation,
            PEFT's shapes and names); ``encoder_hidden_size`` defaults to ``D``. A vocabulary or text
            ``init`` then sets the encoder's input embeddings.

    Raises:
        ValueError: no input embeddings, a count not an int >= 1, an unknown encoder, an init of
            another type, a text init without tokenizer or with tokens outside the vocabulary, a
            saved prompt that is not a floating ``[P, D]`` tensor for this model, a prompt file
            that is missing or not :func:`save_prompt`'s, a saved prompt with an encoder, or a
            prompt already present.
        NotImplementedError: question answering models (their start/end positions would shift).
    """
    caller = "deltakern.add_prompt"
    saved = _saved_prompt(init, caller)
    if saved is None and (not isinstance(init, str) or not init):
        raise ValueError(f"{caller}: init must be 'random', 'vocab', a non-empty text, a saved prompt file (an "
                         f"os.PathLike or a '.safetensors' path) or a tensor [P, D], got {init!r}")
    if saved is not None:
        _check_count("num_virtual_tokens", num_virtual_tokens, caller)
        if encoder is not None:
            # The saved rows are the virtual tokens themselves; an encoder would take them as its input.
            raise ValueError(f"{caller}: a saved prompt initialises the virtual tokens themselves and cannot be "
                             f"used with encoder={encoder!r}; use encoder=None")
        width = _input_embeddings(model, caller).embedding_dim
        if not saved.is_floating_point() or tuple(saved.shape) != (num_virtual_tokens, width):
            raise ValueError(f"{caller}: the saved prompt must be a floating tensor of shape (num_virtual_tokens, "
                             f"embedding width) = {(num_virtual_tokens, width)}, got {saved.dtype} of shape "
                             f"{tuple(saved.shape)}")
    prompt = _attach(model, num_virtual_tokens, encoder, encoder_hidden_size, 2, caller)
    embeddings = model.get_input_embeddings()
    if saved is not None:
        with torch.no_grad():
            prompt.embedding.weight[:num_virtual_tokens].copy_(saved)
        return model
    ids = _init_ids(init, prompt.embedding.num_embeddings, embeddings.num_embeddings, tokenizer,
                    embeddings.weight.device, caller)
    if ids is not None:
        with torch.no_grad():
            prompt.embedding.weight.copy_(embeddings.weight[ids])
    return model


# ---------------------------------------------------------------------------------------------
# A prompt on its own: one file, for initialising another model's prompt (PPT)
# ---------------------------------------------------------------------------------------------

PROMPT_FILE_FORMAT = {"format": "deltakern_prompt", "format_version": "1"}
PROMPT_FILE_KEY = "prompt_embeddings"


def save_prompt(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the ``P`` virtual tokens ``model`` reads, ``[P, D]`` (for P-tuning or an intrinsic
    prompt: what the encoder produces), to the file ``path``: a safetensors file with the one
    tensor ``"prompt_embeddings"`` and the metadata ``format=deltakern_prompt, format_version=1``.
    ``add_prompt(other, P, init=path)`` starts from it; the model's dtype is kept bit for bit.

    Raises:
        ValueError: ``model`` has no deltakern prompt.
    """
    from safetensors.torch import save_file

    caller = "deltakern.save_prompt"
    if not has_prompt(model):
        raise ValueError(f"{caller}: {type(model).__name__} has no deltakern prompt")
    with torch.no_grad():
        rows = model.get_submodule(PROMPT_ATTRIBUTE).prompts().detach().contiguous().cpu()
    save_file({PROMPT_FILE_KEY: rows}, os.fspath(path), metadata=PROMPT_FILE_FORMAT)


def load_prompt(path: str | os.PathLike) -> torch.Tensor:
    """The ``[P, D]`` prompt :func:`save_prompt` wrote to ``path`` (on the CPU, in its saved dtype).

    Raises:
        ValueError: no such file, or not a prompt file of :func:`save_prompt`'s format.
    """
    from safetensors import safe_open

    caller = "deltakern.load_prompt"
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ValueError(f"{caller}: no prompt file at {name!r}")
    try:
        with safe_open(name, framework="pt") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
            rows = f.get_tensor(PROMPT_FILE_KEY) if keys == [PROMPT_FILE_KEY] else None
    except Exception as error:  # safetensors raises its own error types for a file of another kind
        raise ValueError(f"{caller}: {name!r} is not a safetensors file ({error})") from error
    if rows is None or any(metadata.get(k) != v for k, v in PROMPT_FILE_FORMAT.items()):
        raise ValueError(f"{caller}: {name!r} is not a deltakern prompt file (expected the one tensor "
                         f"{PROMPT_FILE_KEY!r} and metadata {PROMPT_FILE_FORMAT}, got tensors {keys} and "
                         f"metadata {metadata})")
    return rows


def _saved_prompt(init, caller: str) -> torch.Tensor | None:
    """``init`` as a saved prompt tensor (read from its file if a path), or None when it is not one."""
    if isinstance(init, torch.Tensor):
        return init.detach()
    if isinstance(init, os.PathLike) or (isinstance(init, str) and init.endswith(".safetensors")):
        try:
            return load_prompt(init)
        except ValueError as error:
            raise ValueError(f"{caller}: init={os.fspath(init)!r}: {error}") from error
    return None


def has_prompt(model: nn.Module) -> bool:
    """Whether ``model`` holds a deltakern prompt."""
    return any(isinstance(module, VirtualTokens) for module in model.modules())


def fold_prompt_encoder(model: nn.Module) -> nn.Module:
    """Replace a P-tuning prompt encoder by the embeddings it produces (for inference) and return
    ``model``; outputs are unchanged. The folded model still saves as a PEFT ``P_TUNING`` checkpoint.

    Raises:
        ValueError: ``model`` has no deltakern prompt, or its prompt has no encoder (plain prompt
            tuning, or already folded).
        NotImplementedError: an intrinsic prompt (its decoder stays; save it as a plain prompt).
    """
    caller = "deltakern.fold_prompt_encoder"
    if not has_prompt(model):
        raise ValueError(f"{caller}: {type(model).__name__} has no deltakern prompt")
    prompt = model.get_submodule(PROMPT_ATTRIBUTE)
    if not isinstance(prompt, PromptEncoder):
        raise NotImplementedError(f"{caller}: the prompt of {type(model).__name__} ({type(prompt).__name__}) is not "
                                  f"folded in place; deltakern.save writes the embeddings it produces")
    if prompt.encoder is None:
        raise ValueError(f"{caller}: the prompt of {type(model).__name__} has no prompt encoder to fold")
    prompt.fold()
    return model


# ---------------------------------------------------------------------------------------------
# PEFT's checkpoint format
# ---------------------------------------------------------------------------------------------

def _task_type(model: nn.Module, caller: str) -> str:
    task = peft_task_type(model)
    if task is None:
        raise NotImplementedError(
            f"{caller}: PEFT has no prompt-tuning task type for {type(model).__name__} (its prompt learning "
            f"models are causal LM, seq2seq LM, sequence/token classification and bare models; a PEFT model "
            f"without task type ignores the prompt)"
        )
    return task


def peft_prompt_checkpoint(model: nn.Module) -> tuple[dict, dict]:
    """``(adapter_config, state_dict)`` as PEFT's ``save_pretrained`` writes prompt tuning or P-tuning.

    The weights are ``{"prompt_embeddings": [S·P, D]}``: for P-tuning the encoder's output, as PEFT
    saves it (and loads it into plain embeddings for inference); for an intrinsic prompt its
    decoder's output ``f(z)``, as plain ``PROMPT_TUNING`` embeddings (z and the decoder are not
    saved). Sequence and token classification also hold the head (``base_model.classifier.*`` or
    ``base_model.score.*``), as PEFT's do.

    Raises:
        NotImplementedError: a model class PEFT's prompt learning has no task type for (e.g. a masked LM).
    """
    caller = "deltakern.save"
    prompt = model.get_submodule(PROMPT_ATTRIBUTE)
    task = _task_type(model, caller)
    with torch.no_grad():
        rows = prompt().detach().clone()
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    config = {
        **peft_config_fields(model, prompt.peft_type, task),
        "modules_to_save": None,
        "num_attention_heads": getattr(text_config, "num_attention_heads", None),
        "num_layers": getattr(text_config, "num_hidden_layers", None),
        "num_transformer_submodules": rows.shape[0] // prompt.num_virtual_tokens,
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "token_dim": rows.shape[1],
    }
    if prompt.peft_type == "P_TUNING":
        config.update(encoder_dropout=0.0, encoder_hidden_size=prompt.encoder_hidden_size,
                      encoder_num_layers=prompt.encoder_num_layers, encoder_reparameterization_type=prompt.reparameterization)
    else:
        # The init is only used when training starts; PEFT reads the weights of an inference checkpoint.
        config.update(prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_kwargs=None,
                      tokenizer_name_or_path=None)
    state = {"prompt_embeddings": rows}
    config["modules_to_save"], head = task_head_checkpoint(model, task)
    return config, {**state, **head}


def load_peft_prompt(model: nn.Module, config: dict, state: dict) -> nn.Module:
    """Add the prompt a PEFT prompt-tuning or P-tuning checkpoint describes to the plain base
    ``model`` and load it; returns the model. P-tuning loads as plain (folded) embeddings, as PEFT
    does for inference. Other saved modules (``base_model.<name>``, PEFT's ``modules_to_save`` such
    as a classifier) are loaded into the base model.

    Raises:
        ValueError: the checkpoint does not fit the model (width, seq2seq or not, rows), lacks
            ``prompt_embeddings``, or names a module the model does not have.
    """
    caller = "deltakern.load"
    peft_type = config.get("peft_type")
    if peft_type not in ("PROMPT_TUNING", "P_TUNING"):
        raise ValueError(f"{caller}: expected a PROMPT_TUNING or P_TUNING checkpoint, got peft_type={peft_type!r}")
    if "prompt_embeddings" not in state:
        raise ValueError(f"{caller}: the {peft_type} checkpoint has no 'prompt_embeddings', got keys {sorted(state)}")
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    submodules = config.get("num_transformer_submodules") or 1
    if submodules != (2 if encoder_decoder else 1):
        raise ValueError(f"{caller}: num_transformer_submodules={submodules} does not fit {type(model).__name__} "
                         f"(expected {2 if encoder_decoder else 1})")
    prompt = _attach(model, config.get("num_virtual_tokens"), None, None, 2, caller)
    prompt.peft_type = peft_type
    if peft_type == "P_TUNING":
        prompt.encoder_hidden_size = config.get("encoder_hidden_size") or prompt.embedding.embedding_dim
        prompt.encoder_num_layers = config.get("encoder_num_layers", 2)
        prompt.reparameterization = config.get("encoder_reparameterization_type", "MLP")
    weights = state["prompt_embeddings"]
    if tuple(weights.shape) != tuple(prompt.embedding.weight.shape):
        raise ValueError(f"{caller}: prompt_embeddings of shape {tuple(weights.shape)} do not fit {type(model).__name__} "
                         f"(expected {tuple(prompt.embedding.weight.shape)})")
    load_base_model_tensors(model, {k: v for k, v in state.items() if k != "prompt_embeddings"}, caller)
    with torch.no_grad():
        prompt.embedding.weight.copy_(weights)
    return model


# ---------------------------------------------------------------------------------------------
# The methods' declarations: prompt tuning and P-tuning share PEFT's prompt checkpoint format
# ---------------------------------------------------------------------------------------------

E2E_VIRTUAL_TOKENS = 32


def _e2e_reference(config_class: str, **fields):
    """PEFT's ``get_peft_model`` with ``<config_class>(num_virtual_tokens=32, **fields)`` (random init)."""
    def build(base: nn.Module) -> nn.Module:
        import peft

        config = getattr(peft, config_class)(task_type="CAUSAL_LM", num_virtual_tokens=E2E_VIRTUAL_TOKENS, **fields)
        return peft.get_peft_model(base, config)

    return build


def _e2e_pairs(reference: nn.Module, ours: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """PEFT's PromptEncoder and deltakern's share parameter names and shapes (embedding, mlp_head.*)."""
    mine = dict(getattr(ours, PROMPT_ATTRIBUTE).named_parameters())
    theirs = dict(reference.prompt_encoder["default"].named_parameters())
    if set(mine) != set(theirs):
        raise RuntimeError(f"deltakern's prompt parameters {sorted(mine)} are not PEFT's {sorted(theirs)}")
    return [(f"prompt.{name}", parameter, mine[name]) for name, parameter in theirs.items()]


register_method(MethodSpec(
    name="prompt", label="a prompt", present=has_prompt,
    checkpoint=PeftFormat(("PROMPT_TUNING", "P_TUNING"), save=peft_prompt_checkpoint, load=load_peft_prompt),
    e2e=E2EProviders(
        reference=_e2e_reference("PromptTuningConfig"),
        deltakern=lambda base: add_prompt(base, E2E_VIRTUAL_TOKENS),
        pairs=_e2e_pairs, virtual_tokens=E2E_VIRTUAL_TOKENS)))
# P-tuning v1 (an MLP prompt encoder) is saved as a prompt: PEFT's P_TUNING type, read above.
register_method(MethodSpec(
    name="ptuning", label="P-tuning",
    e2e=E2EProviders(
        reference=_e2e_reference("PromptEncoderConfig", encoder_reparameterization_type="MLP"),
        deltakern=lambda base: add_prompt(base, E2E_VIRTUAL_TOKENS, encoder="mlp"),
        pairs=_e2e_pairs, virtual_tokens=E2E_VIRTUAL_TOKENS)))
