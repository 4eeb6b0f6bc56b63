"""PyTorch / ONNX Runtime side of `resnet bench`: the same two workloads, the same timing protocol.

    python python/bench_torch.py --workload infer|train [--arch resnet34] [--batch N] [--size S]
        [--runs 5] [--warmup 1] [--threads 2] [--variant eager|channels_last|compile|bf16|ort|ort_int8|all|A,B,...]
        [--json]

Workloads (as in src/cli/bench.rs):
  infer  eval-mode forward of torchvision's resnet34 (ImageNet stem, 1000 classes), batch 8 at 224x224
  train  one SGD step (lr 0.01, momentum 0.9, weight decay 5e-4) of ResNet-34 with the CIFAR stem
         (conv1 3x3/1 pad 1, maxpool = Identity, 10 classes), batch 64 at 32x32, cross-entropy;
         zero_grad + forward + backward + step

Variants: eager (f32), channels_last (f32), compile (torch.compile, f32, with inductor freezing for infer;
skipped with a note when it fails or its first call takes longer than --compile-timeout s), bf16 (CPU autocast to bfloat16, weights f32), ort
(ONNX Runtime f32, infer only; exported with torch.onnx.export to a temporary file, run in a process that does
not import torch), ort_int8 (that file through onnxruntime.quantization.quantize_static: QDQ, per-channel,
uint8 activations calibrated on the timed input, as `resnet bench --dtype int8` calibrates). Each variant runs in its own subprocess, so peak RSS (getrusage ru_maxrss) is per variant.

`--json` prints one line per variant with the keys of `resnet bench --json` (workload, arch, batch, size,
dtype, threads, median_ms, min_ms, max_ms, images_per_s, peak_rss_mib) plus "variant"; a skipped variant
prints {"variant": ..., "skipped": true, "note": ...} with null timings.
"""
import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time

VARIANTS = ("eager", "channels_last", "compile", "bf16", "ort", "ort_int8")
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=("infer", "train"), default="infer")
    p.add_argument("--arch", choices=ARCHS, default="resnet34")
    p.add_argument("--batch", type=int, help="images per batch (default: 8 for infer, 64 for train)")
    p.add_argument("--size", type=int, help="input height and width (default: 224 for infer, 32 for train)")
    p.add_argument("--runs", type=int, default=5, help="timed runs, after --warmup untimed ones")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads / ORT intra_op_num_threads")
    p.add_argument("--variant", default="eager",
                   help="eager|channels_last|compile|bf16|ort|ort_int8|all, or a comma-separated list")
    p.add_argument("--compile-timeout", type=float, default=120.0,
                   help="skip the compile variant when its first (compiling) call takes longer (s)")
    p.add_argument("--timeout", type=float, default=1800.0, help="hard limit per variant subprocess (s)")
    p.add_argument("--json", action="store_true", help="one JSON line per variant")
    # internal: run exactly one variant in this process / export the ONNX file
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_export", metavar="PATH", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.batch = max(1, a.batch if a.batch is not None else (64 if a.workload == "train" else 8))
    a.size = max(8, a.size if a.size is not None else (32 if a.workload == "train" else 224))
    a.runs = max(1, a.runs)
    a.warmup = max(0, a.warmup)
    a.threads = max(1, a.threads)
    return a


def variant_list(spec: str, workload: str):
    if spec == "all":
        return [v for v in VARIANTS if not (v.startswith("ort") and workload == "train")]
    out = []
    for v in (s.strip() for s in spec.split(",")):
        if v not in VARIANTS:
            raise SystemExit(f"bench_torch.py: unknown variant {v!r} (expected one of {', '.join(VARIANTS)} or all)")
        if v not in out:
            out.append(v)
    return out


# ---------------------------------------------------------------------------------------------- results


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def dtype_of(variant):
    return {"bf16": "bf16", "ort_int8": "int8"}.get(variant, "f32")


def result(a, variant, times_ms, **extra):
    t = sorted(times_ms)
    n = len(t)
    median = t[n // 2] if n % 2 == 1 else (t[n // 2 - 1] + t[n // 2]) / 2.0
    return {
        "workload": a.workload, "arch": a.arch, "batch": a.batch, "size": a.size,
        "dtype": dtype_of(variant), "threads": a.threads, "variant": variant,
        "median_ms": median, "min_ms": t[0], "max_ms": t[-1], "images_per_s": a.batch * 1000.0 / median,
        "peak_rss_mib": peak_rss_mib(), **extra,
    }


def skipped(a, variant, note):
    return {
        "workload": a.workload, "arch": a.arch, "batch": a.batch, "size": a.size,
        "dtype": dtype_of(variant), "threads": a.threads, "variant": variant,
        "median_ms": None, "min_ms": None, "max_ms": None, "images_per_s": None, "peak_rss_mib": None,
        "skipped": True, "note": note,
    }


def emit(a, r):
    if a.json:
        print(json.dumps(r), flush=True)
    elif r.get("skipped"):
        print(f"{r['arch']} {r['workload']} [{r['variant']}]: skipped: {r['note']}", flush=True)
    else:
        extra = f"; compiled in {r['compile_s']:.0f} s" if "compile_s" in r else ""
        print(
            f"{r['arch']} {r['workload']} [{r['variant']}] batch {r['batch']} at {r['size']}x{r['size']} "
            f"({r['threads']} threads): median {r['median_ms']:.1f} ms, min {r['min_ms']:.1f}, "
            f"max {r['max_ms']:.1f} over {a.runs} runs; {r['images_per_s']:.1f} images/s; "
            f"peak RSS {r['peak_rss_mib']:.0f} MiB{extra}",
            flush=True,
        )


def time_runs(a, step):
    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.runs):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1000.0)
    return times


# ---------------------------------------------------------------------------------------------- torch side


def input_values(a):
    """The deterministic image-like input of src/cli/bench.rs: ((i*7919) % 255) / 127.5 - 1."""
    import numpy as np

    n = a.batch * 3 * a.size * a.size
    i = np.arange(n, dtype=np.int64)
    return (((i * 7919) % 255).astype(np.float32) / np.float32(127.5) - np.float32(1.0)).reshape(
        a.batch, 3, a.size, a.size)


def build_model(a):
    import torch

    torch.manual_seed(0)
    if a.workload == "infer":
        import torchvision

        return getattr(torchvision.models, a.arch)().eval()  # random init: the values do not change the work
    sys.path.insert(0, HERE)
    from fixtures.common import ReducedResNet, resnet_layers

    block, layers = resnet_layers(a.arch)
    return ReducedResNet(block, layers, (64, 128, 256, 512), 10, "cifar").train()


class Watchdog:
    """Prints a skip line and ends the process when compilation outruns its budget (whatever the main thread
    is blocked in)."""

    def __init__(self, a, seconds):
        self.a = a
        self.timer = threading.Timer(seconds, self.fire, args=(seconds,))
        self.timer.daemon = True

    def fire(self, seconds):
        emit(self.a, skipped(self.a, "compile", f"torch.compile took longer than {seconds:.0f} s; skipped"))
        sys.stdout.flush()
        os._exit(0)

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()


def run_torch(a, variant):
    import torch

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    model = build_model(a)
    x = torch.from_numpy(input_values(a))
    fmt = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    bf16 = variant == "bf16"
    net = model
    if variant == "compile":
        if a.workload == "infer":
            # PyTorch's recommended CPU inference setting: weights treated as constants, BN folded into the
            # convolutions, mkldnn weight prepacking (needs no_grad rather than inference_mode)
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
        net = torch.compile(model)

    if a.workload == "infer":
        no_grad = torch.no_grad if variant == "compile" else torch.inference_mode

        def step():
            with no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                net(x)
    else:
        classes = model.fc.out_features
        targets = torch.arange(a.batch) % classes
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(net(x), targets)
            loss.backward()
            opt.step()

    extra = {"torch": torch.__version__}
    if variant == "compile":
        t = time.perf_counter()
        try:
            with Watchdog(a, a.compile_timeout):
                step()  # compiles (forward, and backward for train)
        except Exception as e:  # noqa: BLE001 - any compile failure means: skip with a note
            msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
            return skipped(a, variant, f"torch.compile failed: {msg}")
        extra["compile_s"] = time.perf_counter() - t
    return result(a, variant, time_runs(a, step), **extra)


def export_onnx(a, path):
    import torch

    model = build_model(a)
    x = torch.from_numpy(input_values(a))
    with torch.no_grad():
        try:  # the TorchScript exporter needs only `onnx`; the dynamo one needs onnxscript as well
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], output_names=["logits"],
                                  opset_version=17)
        except Exception:  # noqa: BLE001
            torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["logits"], external_data=False)


# ---------------------------------------------------------------------------------------------- ORT side


def quantize_onnx(a, path, out):
    """ORT's post-training static quantization as its docs recommend for CNNs on x86: QDQ, per-channel int8
    weights, uint8 activations (U8S8, the VNNI path), MinMax calibration on the same batch ours calibrates on
    (the timed input)."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class OneBatch(CalibrationDataReader):
        def __init__(self):
            self.left = [{"x": input_values(a)}]

        def get_next(self):
            return self.left.pop() if self.left else None

    prepared = path + ".pre.onnx"
    quant_pre_process(path, prepared)
    quantize_static(prepared, out, OneBatch(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def run_ort(a, variant="ort"):
    if a.workload != "infer":
        return skipped(a, variant, "ONNX Runtime variant is infer only")
    try:
        import onnxruntime as ort
    except ImportError as e:
        return skipped(a, variant, f"onnxruntime not installed ({e})")
    with tempfile.TemporaryDirectory(prefix="bench_torch_onnx_") as d:
        path = os.path.join(d, f"{a.arch}.onnx")
        # export in a separate process so that torch's memory does not count in this variant's peak RSS
        cmd = [sys.executable, os.path.abspath(__file__), "--_export", path, "--workload", a.workload,
               "--arch", a.arch, "--batch", str(a.batch), "--size", str(a.size)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0 or not os.path.exists(path):
            tail = " ".join((p.stderr or p.stdout).strip().splitlines()[-1:])[:300]
            return skipped(a, variant, f"torch.onnx.export failed: {tail}")
        if variant == "ort_int8":
            try:
                quantized = path + ".int8.onnx"
                quantize_onnx(a, path, quantized)
                path = quantized
            except Exception as e:  # noqa: BLE001
                return skipped(a, variant, f"onnxruntime.quantization failed: {e}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = a.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: input_values(a)}

    def step():
        sess.run(None, feed)

    return result(a, variant, time_runs(a, step), onnxruntime=ort.__version__)


# ---------------------------------------------------------------------------------------------- driver


def run_child(a, variant):
    if variant in ("ort", "ort_int8"):
        return run_ort(a, variant)
    return run_torch(a, variant)


def spawn(a, variant):
    """Run one variant in a fresh interpreter; returns its result dict."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--json", "--variant", variant,
           "--workload", a.workload, "--arch", a.arch, "--batch", str(a.batch), "--size", str(a.size),
           "--runs", str(a.runs), "--warmup", str(a.warmup), "--threads", str(a.threads),
           "--compile-timeout", str(a.compile_timeout)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the child's own process group (compile workers included)
        p.communicate()
        return skipped(a, variant, f"no result within {a.timeout:.0f} s; killed")
    for line in reversed(out.strip().splitlines()):
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and r.get("variant") == variant:
            return r
    tail = " ".join(err.strip().splitlines()[-1:])[:300]
    return skipped(a, variant, f"subprocess exited {p.returncode} without a result: {tail}")


def main(argv=None):
    a = parse_args(argv)
    if a._export:
        export_onnx(a, a._export)
        return 0
    variants = variant_list(a.variant, a.workload)
    if a._child:
        (v,) = variants
        emit(a, run_child(a, v))
        return 0
    for v in variants:
        emit(a, spawn(a, v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
