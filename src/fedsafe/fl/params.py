"""LoRA state <-> one flat float32 vector: the plain currency of the client/server boundary.

The layout (names, shapes, offsets) is fixed by the order of PEFT's trainable LoRA parameters, so
every party that builds the same model with the same LoRA config agrees on it without messages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParamSpec:
    """Name, shape and offset of one LoRA tensor inside the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def kind(self) -> str:
        """``A`` or ``B`` for LoRA factors, else ``other``."""
        if ".lora_A." in self.name:
            return "A"
        if ".lora_B." in self.name:
            return "B"
        return "other"

    @property
    def layer(self) -> int | None:
        """Transformer layer index parsed from the name (``...layers.3...``), if any."""
        parts = self.name.split(".")
        for i, p in enumerate(parts[:-1]):
            if p == "layers" and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None


class FlatLoRA:
    """Views a PEFT model's trainable LoRA parameters as one flat vector (get/set without copies of the model)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.params: list[torch.nn.Parameter] = []
        specs = []
        offset = 0
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.params.append(p)
                specs.append(ParamSpec(_canonical(name), tuple(p.shape), offset))
                offset += p.numel()
        if not self.params:
            raise ValueError("the model has no trainable parameters; attach LoRA first")
        self.specs: tuple[ParamSpec, ...] = tuple(specs)
        self.numel = offset

    def get(self) -> torch.Tensor:
        """Current LoRA parameters as a flat float32 CPU vector."""
        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1).float().cpu() for p in self.params])

    def set(self, flat: torch.Tensor) -> None:
        """Load a flat vector into the model's LoRA parameters in place."""
        if flat.ndim != 1 or flat.numel() != self.numel:
            raise ValueError(f"flat LoRA vector has shape {tuple(flat.shape)}, expected ({self.numel},)")
        with torch.no_grad():
            for p, spec in zip(self.params, self.specs):
                p.copy_(flat[spec.offset: spec.offset + spec.numel].view(spec.shape).to(p.device, p.dtype))

    def state_dict(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat vector into a name -> tensor dict (PEFT adapter naming)."""
        return {s.name: flat[s.offset: s.offset + s.numel].view(s.shape).clone() for s in self.specs}

    def from_state_dict(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`state_dict`; raises if a tensor is missing or misshapen."""
        parts = []
        for s in self.specs:
            if s.name not in state:
                raise KeyError(f"adapter tensor {s.name!r} is missing")
            t = state[s.name]
            if tuple(t.shape) != s.shape:
                raise ValueError(f"adapter tensor {s.name!r} has shape {tuple(t.shape)}, expected {s.shape}")
            parts.append(t.reshape(-1).float().cpu())
        return torch.cat(parts)

    def mask(self, kind: str | None = None, layers: list[int] | None = None) -> torch.Tensor:
        """Boolean mask over the flat vector selecting LoRA ``A``/``B`` factors and/or layers."""
        m = torch.zeros(self.numel, dtype=torch.bool)
        for s in self.specs:
            if (kind is None or s.kind == kind) and (layers is None or s.layer in layers):
                m[s.offset: s.offset + s.numel] = True
        return m


def _canonical(name: str) -> str:
    # PEFT's saved adapters drop the adapter name: "...lora_A.default.weight" -> "...lora_A.weight"
    return name.replace(".default.", ".")
