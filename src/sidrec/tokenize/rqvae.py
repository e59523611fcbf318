"""RQ-VAE (TIGER): MLP encoder/decoder around a residual vector quantizer.

Defaults follow TIGER: encoder 512-256-128 -> 32-d latent, 3 levels x 256 codes, commitment
weight 0.25, k-means initialisation of every codebook, and restarts of dead codes (codes no item
used in an epoch are re-seeded from random current residuals).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sidrec.tokenize.quantizers import Quantized, _kmeans, with_recon


@dataclass
class RQVAEConfig:
    hidden: tuple[int, ...] = (512, 256, 128)
    latent_dim: int = 32
    beta: float = 0.25
    epochs: int = 150
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 1e-4


def _mlp(dims: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers[:-1])


class RQVAE(nn.Module):
    def __init__(self, in_dim: int, levels: int, k: int, cfg: RQVAEConfig):
        super().__init__()
        self.encoder = _mlp([in_dim, *cfg.hidden, cfg.latent_dim])
        self.decoder = _mlp([cfg.latent_dim, *reversed(cfg.hidden), in_dim])
        self.codebooks = nn.Parameter(torch.randn(levels, k, cfg.latent_dim) * 0.1)
        self.beta = cfg.beta

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual VQ: returns quantized z (sum of codes), codes [B, L], VQ loss, last residual."""
        res, zq = z, torch.zeros_like(z)
        codes, loss = [], z.new_zeros(())
        last_res = res
        for cb in self.codebooks:
            d = torch.cdist(res.detach(), cb.detach())
            idx = d.argmin(1)
            q = cb[idx]
            loss = loss + ((res.detach() - q) ** 2).sum(-1).mean() + self.beta * ((res - q.detach()) ** 2).sum(-1).mean()
            zq = zq + q
            codes.append(idx)
            last_res = res
            res = res - q.detach()
        return zq, torch.stack(codes, 1), loss, last_res

    def forward(self, x):
        z = self.encoder(x)
        zq, codes, vq_loss, _ = self.quantize(z)
        zq_st = z + (zq - z).detach()  # straight-through estimator
        recon = self.decoder(zq_st)
        return recon, codes, ((recon - x) ** 2).sum(-1).mean() + vq_loss

    @torch.no_grad()
    def kmeans_init(self, x: torch.Tensor, seed: int) -> None:
        res = self.encoder(x)
        for level in range(self.codebooks.shape[0]):
            c = torch.from_numpy(_kmeans(res.numpy(), self.codebooks.shape[1], seed + level))
            self.codebooks.data[level, : len(c)] = c
            res = res - c[torch.cdist(res, c).argmin(1)]


def rq_vae(x: np.ndarray, levels: int, k: int, seed: int = 0, cfg: RQVAEConfig | None = None) -> Quantized:
    cfg = cfg or RQVAEConfig()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    n = len(xt)
    k_eff = min(k, n)
    model = RQVAE(xt.shape[1], levels, k_eff, cfg)
    model.kmeans_init(xt, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bar = tqdm(range(cfg.epochs), desc="rq-vae", disable=None, leave=False)
    for _ in bar:
        usage = torch.zeros(levels, k_eff, dtype=torch.long)
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, cfg.batch_size):
            _, codes, loss = model(xt[perm[s : s + cfg.batch_size]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for level in range(levels):
                usage[level] += torch.bincount(codes[:, level], minlength=k_eff)
        _restart_dead_codes(model, xt, usage, gen)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        z = model.encoder(xt)
        zq, codes, _, _ = model.quantize(z)
        recon = model.decoder(zq).numpy()
    cbs = model.codebooks.detach()

    def level_dist(j: int, idx: np.ndarray, cur: np.ndarray) -> np.ndarray:
        r = z[torch.from_numpy(idx)] - sum((cbs[l][torch.from_numpy(cur[:, l])] for l in range(j)), 0)
        return torch.cdist(r, cbs[j]).pow(2).numpy()

    extras = {"codebooks": cbs.numpy()}  # + the encoder, so new items can be encoded without a refit
    linears = [m for m in model.encoder if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        extras[f"encoder_{i}_weight"] = lin.weight.detach().numpy().copy()
        extras[f"encoder_{i}_bias"] = lin.bias.detach().numpy().copy()
    return with_recon(x, codes.numpy().astype(np.int64), [k] * levels, recon, level_dist, extras)


@torch.no_grad()
def _restart_dead_codes(model: RQVAE, x: torch.Tensor, usage: torch.Tensor, gen: torch.Generator) -> None:
    """Re-seed codes that no item used this epoch with random residuals of that level."""
    res = model.encoder(x)
    for level, cb in enumerate(model.codebooks.data):
        dead = torch.nonzero(usage[level] == 0).flatten()
        if len(dead):
            pick = torch.randint(0, len(res), (len(dead),), generator=gen)
            cb[dead] = res[pick] + 1e-3 * torch.randn(len(dead), res.shape[1], generator=gen)
        res = res - cb[torch.cdist(res, cb).argmin(1)]
