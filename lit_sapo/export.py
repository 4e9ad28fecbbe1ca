"""Export the policy as a plain HF folder (config + safetensors + tokenizer) that transformers and vLLM load.

Three ways in:

- from a running module, single process or FSDP2 (`export_module`): the full state dict is gathered to CPU on
  rank 0 (a collective: every rank must call it), then rank 0 writes the folder;
- at the end of `fit`, with the `ExportHF` callback (YAML: `trainer.callbacks: [{class_path: lit_sapo.export.ExportHF}]`),
  into `<trainer.default_root_dir>/hf_model` unless `dirpath` says otherwise;
- from a checkpoint, offline and in one process (`export_checkpoint`, or
  `python -m lit_sapo.export CHECKPOINT OUT_DIR`): a sharded ModelParallelStrategy checkpoint directory (read
  with torch.distributed.checkpoint, resharded to one process) or a single-file `.ckpt`.

LoRA policies are exported merged (W + scale * B @ A): the folder is a plain model, not an adapter.
"""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from torch import nn

from lit_sapo.models import LoraSettings, ModelSpec, export_hf_folder, load_policy, load_tokenizer

_METADATA = "meta.pt"  # Lightning's metadata file inside a sharded checkpoint directory


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU. Under FSDP2 a collective: rank 0 gets it, the other ranks get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def merge_lora(state: dict[str, torch.Tensor], spec: ModelSpec) -> dict[str, torch.Tensor]:
    """A peft LoRA state dict folded into plain base-model keys; any other state dict is returned as is."""
    if not any(".lora_A." in k for k in state):
        return state
    lora = spec.lora
    scale = lora.alpha / lora.r if lora is not None else 1.0
    merged = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        if ".base_layer." in key:
            prefix = key.split(".base_layer.")[0]
            if key.endswith("weight") and f"{prefix}.lora_A.default.weight" in state:
                a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
                value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
            key = key.replace(".base_layer.", ".")
        merged[re.sub(r"^base_model\.model\.", "", key)] = value
    return merged


def _base_model(policy: nn.Module) -> nn.Module:
    get_base = getattr(policy, "get_base_model", None)  # peft
    return get_base() if callable(get_base) else policy


def export_module(module, out_dir: str | Path) -> Path:
    """Write `module.policy` (a SAPOModule's) to `out_dir` as a HF folder. Call it on every rank."""
    state = full_state_dict(module.policy)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        export_hf_folder(_base_model(module.policy), module.tokenizer, out_dir, state_dict=merge_lora(state, module.spec))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return Path(out_dir)


def _spec_from_hparams(meta: dict) -> ModelSpec:
    spec = (meta.get("hyper_parameters") or {}).get("model")
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, dict):  # LightningCLI stores the parsed config: nested dicts
        spec = dict(spec)
        if isinstance(spec.get("lora"), dict):
            spec["lora"] = LoraSettings(**spec["lora"])
        return ModelSpec(**spec)
    return ModelSpec()  # SAPOModule's default model


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, model: ModelSpec | str | None = None) -> Path:
    """Write the policy of a Lightning checkpoint (sharded directory or single file) to `out_dir`, in one process.

    `model` names the architecture to load the weights into; default: the model in the checkpoint's hyper-parameters.
    """
    path = Path(checkpoint)
    sharded = path.is_dir()
    if sharded and not (path / _METADATA).exists():
        raise ValueError(f"{path} is a directory but not a sharded Lightning checkpoint (no {_METADATA})")
    # weights_only: a checkpoint is data; a crafted pickle must not run code here
    try:
        meta = torch.load(path / _METADATA if sharded else path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a plain-data checkpoint, refusing to unpickle it ({first})") from None
    spec = ModelSpec(name=model) if isinstance(model, str) else model or _spec_from_hparams(meta)
    policy = load_policy(spec)
    local = {f"policy.{k}": v for k, v in policy.state_dict().items()}
    if sharded:
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load({"state_dict": local}, checkpoint_id=str(path), no_dist=True)  # reshards into full tensors
        state = {k.removeprefix("policy."): v for k, v in local.items()}
    else:
        saved = meta["state_dict"]
        missing = sorted(set(local) - set(saved))
        if missing:
            raise ValueError(f"{path}: the checkpoint lacks {len(missing)} policy weights, e.g. {missing[:3]}")
        state = {k.removeprefix("policy."): saved[k] for k in local}
    return export_hf_folder(_base_model(policy), load_tokenizer(spec), out_dir, state_dict=merge_lora(state, spec))


class ExportHF(Callback):
    """Export the trained policy as a HF folder at the end of `fit` (also when it stops early).

    Args:
        dirpath: output folder; default `<trainer.default_root_dir>/hf_model`.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.last_path: Path | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        out = Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "hf_model"
        # every rank takes part in the gather; rank 0 writes
        self.last_path = export_module(pl_module, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_sapo.export",
                                     description="Write a HF model folder from a lit-sapo checkpoint.")
    parser.add_argument("checkpoint", help="a sharded checkpoint directory or a .ckpt file")
    parser.add_argument("out_dir", help="the HF folder to write")
    parser.add_argument("--model", default=None,
                        help="model name to load the weights into (default: the one in the checkpoint)")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out_dir, model=args.model)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
