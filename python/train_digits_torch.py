"""The `digits` recipe in PyTorch, for comparison with `resnet train` (issue: accuracies within 1.5 points).

Same network (torchvision ResNet-34 with the CIFAR stem), same data (scikit-learn's digits, grey levels
round(v*255/16) replicated to RGB), same seeded train/test split (python/digits_split.py), same augmentation
(random 8x8 crop of the zero-padded image), normalisation, SGD, warm-up + cosine per step, batch size, epochs.
Random draws (init, shuffling, crops) differ between the two implementations, so compare accuracies, not logits.

    python python/train_digits_torch.py [--seed 0] [--threads 2] [--recipe recipes/digits.toml]
"""
import argparse
import json
import math
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "python" / "fixtures"))
from common import BasicBlock, ReducedResNet  # noqa: E402
from digits_split import split_indices  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "digits.toml"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    r = tomllib.loads(Path(args.recipe).read_text())

    d = load_digits()
    grey = np.floor(d.data * 255.0 / 16.0 + 0.5).astype(np.float32) / 255.0  # round half up, as the Rust side
    x = torch.from_numpy(grey.reshape(-1, 1, 8, 8).repeat(3, axis=1))
    y = torch.from_numpy(d.target).long()
    train_idx, test_idx = split_indices(len(y), r["val_fraction"], args.seed)
    mean = torch.tensor(r["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(r["std"]).view(1, 3, 1, 1)
    xtr, ytr = x[train_idx], y[train_idx]
    xte, yte = (x[test_idx] - mean) / std, y[test_idx]

    model = ReducedResNet(BasicBlock, [3, 4, 6, 3], (64, 128, 256, 512), 10, "cifar")
    opt = torch.optim.SGD(model.parameters(), lr=r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"])
    bs, epochs, pad = r["batch_size"], r["epochs"], r["crop_padding"]
    spe = len(ytr) // bs  # drop_last
    total, warm = spe * epochs, spe * r.get("warmup_epochs", 0)
    start_factor = r.get("warmup_start_factor", 0.1)

    def lr_at(step: int) -> float:
        if step < warm:
            return r["lr"] * (start_factor + (1 - start_factor) * step / warm)
        t, span = step - warm, max(1, total - warm)
        return r.get("min_lr", 0.0) + (r["lr"] - r.get("min_lr", 0.0)) * (1 + math.cos(math.pi * t / span)) / 2

    t0 = time.time()
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr))
        for b in range(spe):
            idx = perm[b * bs:(b + 1) * bs]
            xb = F.pad(xtr[idx], (pad, pad, pad, pad))
            ox = torch.randint(0, 2 * pad + 1, (len(idx),))
            oy = torch.randint(0, 2 * pad + 1, (len(idx),))
            xb = torch.stack([im[:, j:j + 8, i:i + 8] for im, i, j in zip(xb, ox.tolist(), oy.tolist())])
            xb = (xb - mean) / std
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=r.get("label_smoothing", 0.0))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
        model.eval()
        with torch.no_grad():
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        print(json.dumps({"epoch": epoch + 1, "train_loss": loss.item(), "val_top1": acc}), flush=True)
    print(json.dumps({"framework": "pytorch", "val_top1": acc, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
