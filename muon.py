"""--optimizer muon: torch.optim.Muon for the blocks' matrices, AdamW for the rest (docs/muon_lab_log.md)."""
import torch
import torch.nn as nn


class MuonAdamW:
    """
    torch.optim.Muon for the blocks' 2-D weights and AdamW for everything else, stepped, zeroed and
    saved as one optimizer. adjust_lr_fn="match_rms_adamw" scales each matrix's orthogonal update to an
    RMS of 0.2 * lr, about AdamW's, so the recipe's lr and weight decay carry over (Liu et al. 2025,
    "Muon is Scalable for LLM Training"). With split_qkv each fused c_attn weight (3C, C) is
    orthogonalised as three (C, C) matrices, q, k and v apart: Muon steps views of it.
    """

    def __init__(self, model, adamw, lr, weight_decay, momentum, split_qkv):
        self.adamw = adamw
        self.qkv = []  # (fused c_attn weight, its q, k, v views) when split_qkv
        matrices = []
        for name, p in model.transformer.h.named_parameters():
            if p.dim() != 2:
                continue
            if split_qkv and name.endswith("attn.c_attn.weight"):
                views = [nn.Parameter(part) for part in p.data.chunk(3)]  # share p's storage
                self.qkv.append((p, views))
                matrices += views
            else:
                matrices.append(p)
        # momentum 0.95 with Nesterov, 5 Newton-Schulz steps: torch.optim.Muon's defaults, Jordan's values
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn="match_rms_adamw")

    @property
    def param_groups(self):
        return self.muon.param_groups + self.adamw.param_groups

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)
        for p, _ in self.qkv:
            p.grad = None  # in neither optimizer: Muon holds its views

    def share_grads(self):
        for p, views in self.qkv:
            for view, grad in zip(views, p.grad.chunk(3)):
                view.grad = grad  # a view: clipping or unscaling p.grad in place changes it too

    def step(self):
        self.share_grads()
        self.muon.step()
        self.adamw.step()

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
