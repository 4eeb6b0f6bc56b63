"""Check resnet-rs ONNX exports in the ONNX reference tools: `onnx.checker.check_model(full_check=True)` (which
runs shape inference) and ONNX Runtime's CPU provider against the logits resnet-rs computed itself.

    python python/check_onnx.py DIR [--tol 1e-5]

DIR holds cases `NAME.onnx`, `NAME.input.npy` and `NAME.expected.npy` (tests/export.rs writes them); every case
is run and printed, and the exit code is 1 when any check fails, a result is not finite, or the relative error
‖ort − ours‖ / ‖ours‖ exceeds the tolerance. Needs only numpy, onnx and onnxruntime (requirements-ci.txt), no
torch, so CI runs it.
"""

import argparse
import json
import pathlib
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir", type=pathlib.Path)
    p.add_argument("--tol", type=float, default=1e-5)
    a = p.parse_args()
    cases = sorted(a.dir.glob("*.onnx"))
    if not cases:
        print(f"{a.dir}: no .onnx cases", file=sys.stderr)
        return 1
    failed = 0
    for path in cases:
        name = path.name[: -len(".onnx")]
        try:
            model = onnx.load(str(path))
            onnx.checker.check_model(model, full_check=True)
            opset = max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
            x = np.load(a.dir / f"{name}.input.npy")
            want = np.load(a.dir / f"{name}.expected.npy")
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            meta = session.get_modelmeta().custom_metadata_map
            json.loads(meta["preprocess"])  # the model card travels with the file
            (got,) = session.run(None, {session.get_inputs()[0].name: x})
            if got.shape != want.shape:
                raise ValueError(f"output shape {got.shape}, ours {want.shape}")
            if not (np.isfinite(got).all() and np.isfinite(want).all()):
                raise ValueError("non-finite values")
            diff = got.astype(np.float64) - want.astype(np.float64)
            rel = float(np.linalg.norm(diff) / max(np.linalg.norm(want.astype(np.float64)), 1e-30))
            ok = rel <= a.tol
            print(f"{name}: opset {opset}, output {list(got.shape)}, relative error {rel:.2e} "
                  f"{'ok' if ok else f'EXCEEDS {a.tol:.0e}'}")
            failed += not ok
        except Exception as e:  # one line per failing case, then the next
            print(f"{name}: FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            failed += 1
    print(f"{len(cases) - failed}/{len(cases)} cases pass (onnx {onnx.__version__}, onnxruntime {ort.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
