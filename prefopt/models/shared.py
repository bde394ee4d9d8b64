"""One frozen base, one LoRA config, a named adapter per role.

Every policy (PPO, DPO, ...) and the reward model are LoRA adapters on the *same* base weights, created from
the *same* :class:`LoraSettings`. The reference policy is the base with adapters disabled, so it costs no
memory and is identical for every method. Scalar heads (reward-model score, PPO value) are small linear layers
kept beside the adapters.
"""

from __future__ import annotations

import os
import shutil
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prefopt.models.kernels import use_onednn_linears

HEADS_FILE = "heads.safetensors"


@dataclass
class LoraSettings:
    """The LoRA config every policy and the reward model use (one config: comparisons stay fair)."""

    r: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout; 0 keeps log-probs deterministic (PPO needs that)."})
    target_modules: str | list[str] = field(
        default="all-linear", metadata={"help": "Modules to adapt; 'all-linear' = every linear layer but the LM head."}
    )

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )


def checkpoint_layers(lm) -> None:
    """Activation checkpointing of every decoder layer: with gradients enabled, a layer keeps only its input and
    recomputes its activations in the backward pass (torch.utils.checkpoint, non-reentrant), so a training
    forward holds about one layer's activations instead of all of them, for one more forward of compute. The
    recomputation is the same computation (no dropout: LoRA dropout is 0 by default, and the base runs in eval
    mode), so the gradients are the ones without it. Without gradients (sampling, scoring) nothing changes.
    transformers' own switch needs the model in training mode, which prefopt never uses."""
    from torch.utils.checkpoint import checkpoint

    for layer in lm.get_decoder().layers:
        if getattr(layer, "_prefopt_checkpointed", False):
            continue
        plain = layer.forward

        def forward(*args, _plain=plain, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        layer.forward = forward
        layer._prefopt_checkpointed = True


def column_major_weights(lm) -> int:
    """On CPU, store every frozen 2-D weight of ``lm`` (its linear layers, embeddings and LM head) column-major --
    the transpose made contiguous, then viewed back -- and return how many were converted. Same shapes, same
    values, same Parameter objects (tied weights stay tied); only the memory layout changes.

    ``F.linear(x, W)`` multiplies by W's transpose. With W row-major, MKL's GEMM for a few rows of ``x`` (the
    rows of a decoding step) runs far below its rate; with W column-major the transpose is a plain contiguous
    matrix. Measured on this 2-core CPU (2 threads, SmolLM2-135M's 210 decoder matrices): 16 rows 114 -> 54 ms,
    32 rows 134 -> 76 ms, 64 rows and more (training micro-batches) unchanged within noise, forward and the
    backward's input gradient alike; the LM head at 16 rows 29 -> 15 ms. Results were bit-identical: the same
    samples and the same logits. Trainable weights (LoRA, heads) are left as they are."""
    n = 0
    if next(lm.parameters()).device.type != "cpu":
        return n
    for mod in lm.modules():
        w = getattr(mod, "weight", None)
        if (isinstance(mod, (nn.Linear, nn.Embedding)) and isinstance(w, torch.Tensor) and w.dim() == 2
                and not w.requires_grad and w.is_contiguous() and min(w.shape) > 1):
            w.data = w.data.t().contiguous().t()
            n += 1
    return n


def _fused_lora_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA ``Linear.forward`` -- ``base(x) + lora_B(lora_A(dropout(x))) * scaling`` per active adapter --
    with the scaling and the sum folded into one ``addmm`` (``out + scaling * (x A^T) B^T``): no separate
    multiply and add over the layer's (tokens, out) output, forward, and no multiply backward. Anything but the
    plain case (adapters off or merged, dropout, a LoRA variant such as DoRA, a bias on B, another dtype, extra
    arguments) runs peft's own forward."""
    if args or kwargs or self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    for a in active:
        if (a in self.lora_variant or not isinstance(self.lora_dropout[a], nn.Identity)
                or self.lora_B[a].bias is not None or self.lora_A[a].weight.dtype != x.dtype):
            return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    if not active or result.dtype != x.dtype:
        return type(self).forward(self, x, *args, **kwargs) if active else result
    out = result.reshape(-1, result.shape[-1])
    flat = x.reshape(-1, x.shape[-1])
    for a in active:
        out = torch.addmm(out, F.linear(flat, self.lora_A[a].weight), self.lora_B[a].weight.t(), alpha=self.scaling[a])
    return out.view(result.shape)


def fuse_lora(lm) -> int:
    """Give every peft LoRA ``Linear`` in ``lm`` the forward of :func:`_fused_lora_forward` (once; an instance
    attribute, so peft's class is untouched) and return how many it patched. The same function to float
    rounding, forward and backward (tested against peft's); a PPO update epoch of SmolLM2-135M runs 210 such
    layers per micro-batch."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for mod in lm.modules():
        if type(mod) is LoraLinear and not getattr(mod, "_prefopt_fused", False):
            mod.forward = types.MethodType(_fused_lora_forward, mod)
            mod._prefopt_fused = True
            n += 1
    return n


class SharedBase:
    """A frozen causal LM with named LoRA roles and optional scalar heads.

    >>> shared = SharedBase(lm, tok, LoraSettings())
    >>> shared.add_role("dpo"); shared.add_role("rm", head=True)
    >>> with shared.role("dpo"): ...        # the DPO policy
    >>> with shared.reference(): ...       # base, adapters off
    """

    def __init__(self, lm, tokenizer, lora: LoraSettings, checkpoint_activations: bool = False):
        self.tokenizer = tokenizer
        self.lora = lora
        self.checkpoint_activations = checkpoint_activations
        if checkpoint_activations:
            checkpoint_layers(lm)
        self.peft = None
        self._lm = lm  # the (LoRA-injected once roles exist) LlamaForCausalLM-like module
        self.heads = nn.ModuleDict()
        self.roles: list[str] = []
        self._trainable: list[nn.Parameter] = []  # handed out by adapter_parameters(); kept trainable across switches
        lm.requires_grad_(False)
        lm.eval()
        column_major_weights(lm)
        use_onednn_linears(lm)  # where this CPU runs oneDNN's fp32 products faster than MKL's (models/kernels.py)

    @property
    def lm(self):
        """The causal LM with LoRA layers injected in place: calls use the active role's adapter."""
        return self._lm

    @property
    def device(self) -> torch.device:
        return next(self._lm.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self._lm.get_output_embeddings().weight.shape[1]

    def add_role(self, name: str, *, head: bool = False, seed: int | None = None) -> None:
        """Add a fresh LoRA adapter ``name`` (same LoraSettings as every other role), plus a scalar head.

        With ``seed`` the initial weights are a function of the seed alone (the global RNG is left untouched), so
        every policy of a run starts from the same adapter, and a stage gives the same result whether the stages
        before it ran in this process or came from a cache.
        """
        if name in self.roles:
            raise ValueError(f"role {name!r} already exists")
        if seed is None:
            self._add_role(name, head)
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            self._add_role(name, head)

    def _add_role(self, name: str, head: bool) -> None:
        from peft import get_peft_model

        if self.peft is None:
            self.peft = get_peft_model(self._lm, self.lora.to_peft(), adapter_name=name)
            self._lm = self.peft.get_base_model()
        else:
            self.peft.add_adapter(name, self.lora.to_peft())
        fuse_lora(self._lm)
        self.roles.append(name)
        if head:
            lin = nn.Linear(self.hidden_size, 1, device=self.device, dtype=torch.float32)
            nn.init.normal_(lin.weight, std=1.0 / (self.hidden_size + 1) ** 0.5)
            nn.init.zeros_(lin.bias)
            self.heads[name] = lin
        self._lm.eval()  # dropout stays off everywhere

    # ------------------------------------------------------------------------------------------ artifacts
    def save_role(self, name: str, folder: str | Path) -> Path:
        """Write role ``name`` as a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
        loadable with ``PeftModel.from_pretrained(base, folder)``), plus its head in ``heads.safetensors``."""
        from safetensors.torch import save_file

        if name not in self.roles:
            raise KeyError(f"unknown role {name!r}; roles: {self.roles}")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / ".peft-save"
        shutil.rmtree(staging, ignore_errors=True)
        self.peft.save_pretrained(str(staging), selected_adapters=[name], save_embedding_layers=False)
        written = staging / name if (staging / name).is_dir() else staging  # peft nests non-"default" names
        for item in written.iterdir():
            if item.is_file():
                os.replace(item, folder / item.name)
        shutil.rmtree(staging, ignore_errors=True)
        if name in self.heads:
            state = {k: v.detach().contiguous().cpu() for k, v in self.heads[name].state_dict().items()}
            save_file(state, str(folder / HEADS_FILE), metadata={"format": "pt"})
        return folder

    def load_role(self, name: str, folder: str | Path) -> None:
        """Add role ``name`` from a folder written by :meth:`save_role` (or any PEFT LoRA adapter folder)."""
        from peft import PeftModel
        from safetensors.torch import load_file

        if name in self.roles:
            raise ValueError(f"role {name!r} already exists")
        folder = Path(folder)
        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self._lm, str(folder), adapter_name=name, is_trainable=False)
            self._lm = self.peft.get_base_model()
        else:
            self.peft.load_adapter(str(folder), adapter_name=name, is_trainable=False)
        fuse_lora(self._lm)
        self.roles.append(name)
        heads = folder / HEADS_FILE
        if heads.is_file():
            state = load_file(str(heads))
            lin = nn.Linear(state["weight"].shape[1], 1, device=self.device, dtype=torch.float32)
            lin.load_state_dict({k: v.to(self.device) for k, v in state.items()})
            self.heads[name] = lin
        self._lm.eval()

    @contextmanager
    def role(self, name: str):
        """Run the base with role ``name``'s adapter active."""
        if name not in self.roles:
            raise KeyError(f"unknown role {name!r}; roles: {self.roles}")
        prev = self.peft.active_adapter
        self._activate(name)
        try:
            yield self._lm
        finally:
            self._activate(prev)

    def _activate(self, name: str) -> None:
        # peft's set_adapter also sets requires_grad=False on every other adapter; a role being trained (e.g. a
        # value adapter used inside the policy's update) must stay trainable while another role runs
        self.peft.set_adapter(name)
        for p in self._trainable:
            p.requires_grad_(True)

    @contextmanager
    def reference(self):
        """Run the base with every adapter disabled: the reference policy pi_ref."""
        if self.peft is None:
            yield self._lm
            return
        with self.peft.disable_adapter():
            yield self._lm

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable parameters of role ``name``: its LoRA matrices and its head (if any)."""
        params = [p for n, p in self.peft.named_parameters() if f".{name}." in n and "lora_" in n]
        if not params:
            raise KeyError(f"role {name!r} has no LoRA parameters")
        if name in self.heads:
            params += list(self.heads[name].parameters())
        for p in params:
            p.requires_grad_(True)
        known = {id(p) for p in self._trainable}
        self._trainable += [p for p in params if id(p) not in known]
        return params

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """A detached copy of a role's weights (adapter + head), for checks and checkpoints."""
        state = {n: p.detach().clone() for n, p in self.peft.named_parameters() if f".{name}." in n and "lora_" in n}
        if name in self.heads:
            state.update({f"head.{k}": v.detach().clone() for k, v in self.heads[name].state_dict().items()})
        return state

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Copy weights named as :meth:`adapter_state` gives them back into role ``name`` (a checkpoint's restore)."""
        current = dict(self.peft.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith("head."):
                    self.heads[name].get_parameter(key.split(".", 1)[1]).copy_(value)
                else:
                    current[key].copy_(value)

    def merge_role(self, name: str) -> "SharedBase":
        """A new SharedBase whose frozen base is this base with role ``name``'s adapter merged into its weights
        (the SFT stage: the SFT model becomes the base, and "adapters off" is the SFT model, the reference of every
        later stage). Only a base whose sole role is ``name`` can be merged: the other adapters were trained
        against the old base."""
        if self.roles != [name]:
            raise ValueError(f"merge_role({name!r}) needs {name!r} to be the only role, have {self.roles}")
        self.peft.set_adapter(name)
        merged = self.peft.merge_and_unload()
        merged.requires_grad_(False)
        merged.eval()
        self.peft, self.roles, self._trainable = None, [], []  # this object no longer holds a usable base
        return SharedBase(merged, self.tokenizer, self.lora, self.checkpoint_activations)

    def base_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self._lm.named_parameters() if "lora_" not in n}
