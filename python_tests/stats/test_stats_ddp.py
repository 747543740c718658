"""Data-parallel statistics for real: 2 processes, gloo, CPU, against one process over the same micro-batches."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import pnekern

K, W = 3, 2
KEYS = ["trace_noise", "trace_precond_noise", "grad_norm_sq", "temperature", "diffusion", "pne", "noise_scale_raw"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 2))


def _micro(rank, k, step):
    g = torch.Generator().manual_seed(10_000 * step + 100 * rank + k)
    return torch.randn(5, 6, generator=g), torch.randn(5, 2, generator=g)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, mode, out):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=W)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        opt = pnekern.AdamW(model.parameters(), lr=1e-2, stats=mode, batch_size=5 * K * W)
        results = []
        for step in range(3):
            for k in range(K):
                x, y = _micro(rank, k, step)
                if k < K - 1:
                    with model.no_sync():
                        (((model(x) - y) ** 2).mean() / K).backward()
                else:
                    (((model(x) - y) ** 2).mean() / K).backward()
            opt.step()
            opt.zero_grad()
            d = opt.last_stats().to_dict()
            results.append({key: d[key] for key in KEYS + ["num_contributions"]})
        out[rank] = results
    finally:
        dist.destroy_process_group()


def _single(mode):
    model = _model()
    opt = pnekern.AdamW(model.parameters(), lr=1e-2, stats=mode, batch_size=5 * K * W)
    results = []
    for step in range(3):
        for rank in range(W):
            for k in range(K):
                x, y = _micro(rank, k, step)
                # DDP averages over ranks: the same step gradient comes from scaling each contribution by 1/W.
                (((model(x) - y) ** 2).mean() / (K * W)).backward()
        opt.step()
        opt.zero_grad()
        d = opt.last_stats().to_dict()
        results.append({key: d[key] for key in KEYS + ["num_contributions"]})
    return results


@pytest.mark.parametrize("mode", ["trace", "diag"])
def test_ddp_two_workers_match_single_process(mode):
    ctx = mp.get_context("spawn")
    manager = ctx.Manager()
    out = manager.dict()
    mp.start_processes(_worker, args=(_free_port(), mode, out), nprocs=W, join=True, start_method="spawn")
    single = _single(mode)
    for rank in range(W):
        for got, want in zip(out[rank], single):
            assert got["num_contributions"] == K * W
            for key in KEYS:
                assert got[key] == pytest.approx(want[key], rel=2e-4), (rank, key)
