"""PyTorch side of bench/gpu.sh: issue 5's GPU workloads, timed with CUDA events, one JSON line each.

    python python/bench_torch_gpu.py [--workloads G1,G2,G3] [--precisions fp32,tf32,bf16] [--runs 20] [--warmup 5]

Workloads (torchvision resnet34, random weights, cudnn.benchmark on, inputs already on the device):
  G1  eval-mode inference, ImageNet stem, 1000 classes, batch 256 at 224x224
  G2  one training step, CIFAR stem (conv1 3x3/1, no max-pool, 10 classes), batch 512 at 32x32
  G3  one training step, ImageNet stem, 1000 classes, batch 256 at 224x224
A training step is zero_grad + forward + cross-entropy + backward + SGD (lr 0.01, momentum 0.9, weight decay
5e-4), as `resnet bench --workload train`.

Precisions: fp32 (TF32 off for convolutions and matmuls: strict IEEE fp32, what our `--dtype f32` does), tf32
(PyTorch's default: TF32 convolutions), bf16 (autocast to bfloat16 on channels-last tensors, fp32 weights).
Each line holds workload, precision, batch, size, median_ms, min_ms, max_ms, images_per_s and setup_s (model
build, the first call with cuDNN's search, and the warm-up).
"""
import argparse
import json
import statistics
import time

import torch
import torchvision

SHAPES = {"G1": ("infer", 256, 224, 1000), "G2": ("train", 512, 32, 10), "G3": ("train", 256, 224, 1000)}


def model_for(workload_id):
    _, _, _, classes = SHAPES[workload_id]
    m = torchvision.models.resnet34(num_classes=classes)
    if workload_id == "G2":
        m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        m.maxpool = torch.nn.Identity()
    return m


def run(workload_id, precision, runs, warmup):
    kind, batch, size, classes = SHAPES[workload_id]
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    dev = torch.device("cuda")
    fmt = torch.channels_last if precision == "bf16" else torch.contiguous_format
    model = model_for(workload_id).to(dev, memory_format=fmt)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=dev, generator=gen).to(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=dev, generator=gen)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16")
    if kind == "infer":
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model(x)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    setup_s = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    median = statistics.median(times)
    return {
        "workload": workload_id, "kind": kind, "precision": precision, "batch": batch, "size": size,
        "device": torch.cuda.get_device_name(), "median_ms": median, "min_ms": min(times), "max_ms": max(times),
        "images_per_s": batch * 1000.0 / median, "setup_s": setup_s,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="G1,G2,G3")
    p.add_argument("--precisions", default="fp32,tf32,bf16")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args()
    for w in a.workloads.split(","):
        for prec in a.precisions.split(","):
            print(json.dumps(run(w, prec, a.runs, a.warmup)), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
