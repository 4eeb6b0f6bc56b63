"""Confirm `resnet export` in PyTorch and ONNX Runtime, for any checkpoint resnet-rs reads (a fine-tuned run's
best.safetensors, say):

    python python/check_export.py CHECKPOINT [--resnet target/release/resnet] [IMAGE ...]

It exports the checkpoint to all three formats with our binary, then:
  - pth: `torch.load(weights_only=True)` opens it and the torchvision model (stem and channels rebuilt from the
    model card) takes it with `load_state_dict(strict=True)`, `num_batches_tracked` included;
  - safetensors: `safetensors.torch.load_file` + the same strict load;
  - onnx: `onnx.checker.check_model(full_check=True)`, and ONNX Runtime's logits against torchvision's on the
    same input (1e-5 relative);
  - and torchvision's logits on the images, preprocessed by torchvision's transforms as the card says, against
    ours from `resnet features --layer fc` (a PNG decodes identically in both, a JPEG within a grey level: the
    same 1e-5 / 5e-3 tolerances as the parity tests).
Exit code 1 when any check fails. Needs requirements.txt (torch, torchvision, onnx, onnxruntime, safetensors).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torchvision import transforms

ROOT = pathlib.Path(__file__).resolve().parent.parent


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def torchvision_model(card: dict, classes: int) -> torch.nn.Module:
    """The torchvision network the card describes: the family's model, its conv1 rebuilt for other channel
    counts, and for the CIFAR stem a 3x3/1 conv1 without the max-pool."""
    m = getattr(torchvision.models, card["arch"])(num_classes=classes)
    channels = card["preprocess"]["channels"]
    if card["stem"] == "cifar":
        m.conv1 = torch.nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        m.maxpool = torch.nn.Identity()
    elif channels != 3:
        m.conv1 = torch.nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    return m.eval()


def preprocess(path: pathlib.Path, pre: dict) -> torch.Tensor:
    img = Image.open(path)
    img = img.convert("L" if pre["channels"] == 1 else "RGB")
    mean, std = pre["mean"], pre["std"]
    t = transforms.Compose([
        transforms.Resize(pre["resize"]),
        transforms.CenterCrop(pre["size"]),
        transforms.ToTensor(),
        transforms.Normalize(mean * pre["channels"] if len(mean) == 1 else mean,
                             std * pre["channels"] if len(std) == 1 else std),
    ])
    return t(img)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="*", type=pathlib.Path)
    p.add_argument("--resnet", default=str(ROOT / "target/release/resnet"))
    a = p.parse_args()
    images = a.images or sorted((ROOT / "tests/fixtures/images").glob("*.[jp][pn]g"))
    failures = []

    def check(what: str, ok: bool, detail: str):
        print(f"{what}: {detail} {'ok' if ok else 'FAILED'}")
        if not ok:
            failures.append(what)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for fmt in ("onnx", "pth", "safetensors"):
            subprocess.run([a.resnet, "export", a.checkpoint, "--out", str(tmp / f"model.{fmt}")], check=True)
        with safe_open(str(tmp / "model.safetensors"), "pt") as f:
            meta = f.metadata()
        card = {"arch": meta["arch"], "stem": meta["stem"], "preprocess": json.loads(meta["preprocess"])}
        pre = card["preprocess"]
        if pre["channels"] not in (1, 3):
            print(f"{pre['channels']}-channel model: photographs cannot feed it; use tests/export.rs", file=sys.stderr)
            return 1

        sd = torch.load(tmp / "model.pth", weights_only=True)
        classes = sd["fc.weight"].shape[0]
        m = torchvision_model(card, classes)
        result = m.load_state_dict(sd, strict=True)
        check("pth", not result.missing_keys and not result.unexpected_keys,
              f"torch.load(weights_only=True) + strict load of {len(sd)} keys into torchvision {card['arch']} "
              f"({card['stem']} stem, {classes} classes)")
        ms = torchvision_model(card, classes)
        ms.load_state_dict(load_file(str(tmp / "model.safetensors")), strict=True)

        x = torch.stack([preprocess(i, pre) for i in images])
        with torch.no_grad():
            want = m(x).numpy()
            check("safetensors", rel(ms(x).numpy(), want) == 0.0, "strict load, same logits as the pth")

        model = onnx.load(str(tmp / "model.onnx"))
        onnx.checker.check_model(model, full_check=True)
        session = ort.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
        (got,) = session.run(None, {"input": x.numpy()})
        e = rel(got, want)
        check("onnx", e <= 1e-5, f"check_model passes; ONNX Runtime vs torchvision on {len(images)} images: "
                                 f"relative error {e:.2e} (tolerance 1e-5)")

        ours_path = tmp / "ours.npy"
        subprocess.run([a.resnet, "features", "--weights", a.checkpoint, "--layer", "fc", "--out", str(ours_path),
                        *map(str, images)], check=True, stderr=subprocess.DEVNULL)
        ours = np.load(ours_path)
        for i, img in enumerate(images):
            tol = 1e-5 if img.suffix == ".png" else 5e-3
            e = rel(ours[i], want[i])
            check(f"ours {img.parent.name}/{img.name}", e <= tol, f"resnet features --layer fc vs torchvision: relative error {e:.2e} "
                                                 f"(tolerance {tol:.0e})")
    print(f"{'all checks pass' if not failures else 'FAILED: ' + ', '.join(failures)} "
          f"(torch {torch.__version__}, torchvision {torchvision.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {ort.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
