"""The `folder` recipe of resnet-rs in PyTorch, on the same ImageFolder, to compare short from-scratch runs.

resnet-rs's `resnet train --data ROOT` (no recipe named) on a folder of small images trains a ResNet-18 with the
CIFAR stem (3x3/1 convolution, no max-pool) at the images' own size: Resize(size) + CenterCrop(size) (a no-op on
images of that size) + RandomCrop(size, padding=size // 8) + RandomHorizontalFlip, ImageNet mean/std, SGD
(momentum 0.9, weight decay 5e-4 on every parameter), lr 0.05 for batch 64 scaled linearly with the batch, a
cosine schedule stepped every batch after a linear warm-up of one epoch from 0.1·lr, drop_last when the training
set holds at least one batch. This script does the same with torchvision and prints, per epoch, the training
loss and accuracy (train mode, augmented batches), the validation top-1, and at the end the accuracy on the
training images themselves in eval mode (BN running statistics), the figure whose gap to the training accuracy
the comparison is about.

    python python/train_folder_torch.py ROOT --epochs 10 --batch-size 16 --seed 0

ROOT holds train/<class>/ and val/<class>/ (the split is then the folders', not a seeded one).
"""

import argparse
import json
import math

import torch
import torchvision
from torch import nn
from torchvision import transforms as T

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def model(classes):
    m = torchvision.models.resnet18(num_classes=classes)
    m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(m.conv1.weight, mode="fan_out", nonlinearity="relu")
    m.maxpool = nn.Identity()
    return m


def accuracy(m, loader):
    m.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += (m(x).argmax(1) == y).sum().item()
            total += len(y)
    return right / max(total, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", help="start from this state_dict (safetensors) instead of a seeded initialisation")
    ap.add_argument("--no-augment", action="store_true", help="no random crop or flip (resnet-rs: --crop-padding 0 --hflip false)")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(2)
    size = a.size
    to_input = [T.ToTensor(), T.Normalize(MEAN, STD)]
    fit = [T.Resize(size), T.CenterCrop(size)]
    augment = [] if a.no_augment else [T.RandomCrop(size, padding=max(size // 8, 1)), T.RandomHorizontalFlip()]
    train_tf = T.Compose(fit + augment + to_input)
    eval_tf = T.Compose(fit + to_input)
    rgb = lambda p: torchvision.datasets.folder.default_loader(p)  # noqa: E731 (PIL, converted to RGB)
    train = torchvision.datasets.ImageFolder(f"{a.root}/train", train_tf, loader=rgb)
    train_eval = torchvision.datasets.ImageFolder(f"{a.root}/train", eval_tf, loader=rgb)
    val = torchvision.datasets.ImageFolder(f"{a.root}/val", eval_tf, loader=rgb)
    drop_last = len(train) >= a.batch_size
    loader = torch.utils.data.DataLoader(train, a.batch_size, shuffle=True, drop_last=drop_last)
    val_loader = torch.utils.data.DataLoader(val, 64)
    m = model(len(train.classes))
    if a.init:
        from safetensors.torch import load_file

        m.load_state_dict(load_file(a.init))
    lr = 0.05 * a.batch_size / 64
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    spe = len(loader)
    warm, total = spe, a.epochs * spe

    def factor(step):
        if step < warm:
            return 0.1 + 0.9 * step / warm
        span = total - warm
        return (1 + math.cos(math.pi * min(step - warm, span) / max(span, 1))) / 2

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(a.epochs):
        m.train()
        loss_sum = right = seen = 0
        for x, y in loader:
            opt.zero_grad()
            out = m(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            right += (out.argmax(1) == y).sum().item()
            seen += len(y)
        print(json.dumps({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_top1": right / seen,
                          "val_top1": accuracy(m, val_loader)}))
    print(json.dumps({"train_images_eval_top1": accuracy(m, torch.utils.data.DataLoader(train_eval, 64)),
                      "val_top1": accuracy(m, val_loader)}))


if __name__ == "__main__":
    main()
