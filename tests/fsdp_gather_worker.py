"""Run by tests/test_fsdp.py under torchrun (2 gloo processes): a small LoRA-like model trained
2 optimizer steps x 3 micro-batches through sa2va.distributed's FSDP2 wrapping and no_grad_sync,
once per dist.fsdp_gather mode; rank 0 also trains an unwrapped copy on all ranks' data. Writes
the trained weights of each and the number of all-gathers per step to argv[1] (JSON)."""

import json
import sys

import torch
import torch.distributed
from torch import nn

from sa2va import distributed as dist

ACCUM, STEPS, WIDTH, BATCH = 3, 2, 16, 4
GATHERS = [0]


def count_gathers() -> None:
    """Count FSDP2's all-gathers (torch names the collective differently across versions)."""
    for name in ("all_gather_into_tensor", "all_gather_single"):
        original = getattr(torch.distributed, name, None)
        if original is None:
            continue

        def counted(*args, _original=original, **kwargs):
            GATHERS[0] += 1
            return _original(*args, **kwargs)

        setattr(torch.distributed, name, counted)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(WIDTH, WIDTH)  # frozen, as the LLM's base weights
        self.down, self.up = nn.Linear(WIDTH, 2, bias=False), nn.Linear(2, WIDTH, bias=False)
        self.base.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.base(x) + self.up(self.down(x)))


class Policy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Layer() for _ in range(3)])
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def batch(step: int, micro: int, rank: int) -> torch.Tensor:
    return torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(1000 * step + 10 * micro + rank))


def train(model: nn.Module, wrapped: nn.Module, ranks: list[int], enabled: bool) -> list[int]:
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    per_step = []
    for step in range(STEPS):
        before = GATHERS[0]
        for m in range(ACCUM):
            with dist.no_grad_sync(wrapped, enabled=enabled and m < ACCUM - 1):
                for rank in ranks:
                    loss = wrapped(batch(step, m, rank)).square().mean() / (ACCUM * len(ranks))
                    loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        per_step.append(GATHERS[0] - before)
    return per_step


def weights(model: nn.Module) -> dict[str, list]:
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().flatten().tolist()
    return out


def main() -> None:
    info = dist.init_distributed("cpu", "gloo")
    count_gathers()
    result = {}
    for mode in ("per_use", "per_step"):
        policy = Policy()
        wrapped = dist.wrap_policy(policy, "fsdp", info, list(policy.layers), mode)
        gathers = train(policy, wrapped, [info.rank], enabled=True)
        result[mode] = {"weights": weights(policy), "gathers_per_step": gathers}
    if info.is_main:
        reference = Policy()
        train(reference, reference, list(range(info.world_size)), enabled=False)
        result["reference"] = {"weights": weights(reference)}
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.shutdown()


if __name__ == "__main__":
    main()
