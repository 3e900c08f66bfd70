"""Mixed precision: which autocast the forward runs under, and the GradScaler that fp16 needs."""

from __future__ import annotations

import torch

from ..errors import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """``amp=None | "bf16" | "fp16"`` for one device. ``context()`` wraps the forward (and the loss computed in it);
    backward runs outside it, as torch recommends. fp16 gets a GradScaler, whose state goes into snapshots."""

    def __init__(self, amp: str | None, device: torch.device):
        self.amp = amp
        self.scaler = None
        self.unscaled = False  # the current step's gradients were divided by the scale already
        if amp is None:
            return
        dtype = DTYPES[amp]
        if device.type == "cuda" and amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"amp='bf16' on {torch.cuda.get_device_name(device)}, which has no bfloat16 support. "
                              "HINT: use amp='fp16' on this GPU.")
        self.device_type = device.type
        self.dtype = dtype
        if amp == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)

    def context(self):
        """A fresh autocast context, or None without mixed precision (the loop then calls the model directly)."""
        if self.amp is None:
            return None
        return torch.autocast(self.device_type, dtype=self.dtype)

    def unscale(self, optimizer) -> None:
        """Divide the step's gradients by the loss scale now, once (fp16 only), so they can be measured or clipped."""
        if self.scaler is not None and not self.unscaled:
            self.scaler.unscale_(optimizer)
            self.unscaled = True

    def step(self, optimizer, report_skip: bool = False) -> bool:
        """The optimizer step (through the scaler with fp16, which skips it on inf / NaN gradients).

        Returns:
            Whether the step was applied; with fp16 only known when ``report_skip`` (then the gradients are
            unscaled here, and the scaler's inf check is read: the same host sync ``scaler.step`` makes anyway,
            before the step is queued, so no wait for the step itself); True otherwise.
        """
        applied = True
        if self.scaler is not None:
            # fused optimizers (Adam(fused=True)) check for infs in their own kernel, without a sync: read the flags
            # after their step; the others are unscaled first, as scaler.step would do, and read before it
            fused = getattr(optimizer, "_step_supports_amp_scaling", False)
            if report_skip and not fused:
                self.unscale(optimizer)
                applied = not self._found_inf(optimizer)
            self.scaler.step(optimizer)
            if report_skip and fused:
                applied = not self._found_inf(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        self.unscaled = False
        return applied

    def _found_inf(self, optimizer) -> bool:
        # torch keeps the flags in a private dict until update(); GradScaler.step reads them with .item() alike
        found = self.scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        return bool(sum(v.item() for v in found.values()))

    def skip_step(self) -> None:
        """This step is dropped; a scaler that already unscaled must still be told the step is over."""
        if self.scaler is not None and self.unscaled:
            self.scaler.update()
        self.unscaled = False

    def state_dict(self) -> dict | None:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
