"""Train two small digit classifiers on scikit-learn's bundled handwritten digits
and export them to ONNX, together with calibration and test data.

Regenerate everything with:

    python models/train_digits.py

Outputs (next to this script):
    digits_mlp.onnx   - MLP  64-128-64-10
    digits_cnn.onnx   - small CNN with BatchNorm
    digits_calib.npz  - "input": float32 [256,1,8,8] (first 256 shuffled training images)
    digits_test.npz   - "input": float32 [360,1,8,8], "label": int64 [360]
    README.md         - description and measured accuracies

The script is deterministic (fixed seeds, deterministic algorithms, one thread).
"""
import hashlib
import os
import random
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
from sklearn.datasets import load_digits

import onnx
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
N_TEST = 360
N_CALIB = 256
OPSET = 17
IR_VERSION = 8


def set_determinism(seed=0):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def load_data():
    digits = load_digits()
    x = (digits.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    perm = np.random.RandomState(0).permutation(len(x))
    test_idx, train_idx = perm[:N_TEST], perm[N_TEST:]
    return (np.ascontiguousarray(x[train_idx]), np.ascontiguousarray(y[train_idx]),
            np.ascontiguousarray(x[test_idx]), np.ascontiguousarray(y[test_idx]))


def make_mlp():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 128), nn.ReLU(),
        nn.Linear(128, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


def make_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def train(model, x_train, y_train, epochs, lr, batch_size=64, seed=0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    n = len(xt)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def torch_predict(model, x):
    return model.eval()(torch.from_numpy(x)).argmax(1).numpy()


def export(model, path, sample):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), (torch.from_numpy(sample),), path,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET, do_constant_folding=True,
            training=torch.onnx.TrainingMode.PRESERVE,  # model is in eval mode; keeps BN unfused
            dynamo=False,
        )
    m = onnx.load(path)
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    return m


def ort_predict(path, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0].argmax(1)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    set_determinism(0)
    x_train, y_train, x_test, y_test = load_data()
    print(f"train {x_train.shape} test {x_test.shape}")

    np.savez(os.path.join(HERE, "digits_calib.npz"), input=x_train[:N_CALIB])
    np.savez(os.path.join(HERE, "digits_test.npz"), input=x_test, label=y_test)

    specs = [
        ("digits_mlp", make_mlp, dict(epochs=100, lr=2e-3)),
        ("digits_cnn", make_cnn, dict(epochs=20, lr=2e-3)),
    ]
    results = []
    t_total = time.perf_counter()
    for name, ctor, hp in specs:
        torch.manual_seed(0)
        model = ctor()
        n_params = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        train(model, x_train, y_train, **hp)
        t_train = time.perf_counter() - t0
        acc_torch = float((torch_predict(model, x_test) == y_test).mean())

        path = os.path.join(HERE, name + ".onnx")
        m = export(model, path, x_test[:1])
        pred_ort = ort_predict(path, x_test)
        acc_ort = float((pred_ort == y_test).mean())
        agree = float((pred_ort == torch_predict(model, x_test)).mean())
        ops = [n.op_type for n in m.graph.node]
        print(f"{name}: params={n_params} train_time={t_train:.1f}s "
              f"acc_torch={acc_torch:.4f} acc_ort={acc_ort:.4f} agree={agree:.4f}")
        print(f"  ops: {ops}")
        assert acc_torch == acc_ort, f"{name}: torch/onnxruntime accuracy mismatch"
        assert acc_torch >= 0.96, f"{name}: accuracy {acc_torch:.4f} below 0.96"
        results.append(dict(name=name, params=n_params, hp=hp, t=t_train,
                            acc=acc_ort, ops=ops, size=os.path.getsize(path)))
    print(f"total training time {time.perf_counter() - t_total:.1f}s")

    write_readme(results)
    for f in ["digits_mlp.onnx", "digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"]:
        p = os.path.join(HERE, f)
        print(f"{f:18s} {os.path.getsize(p):8d} B  sha256 {sha256(p)}")


def write_readme(results):
    def size(f):
        return os.path.getsize(os.path.join(HERE, f))

    lines = [
        "# Digit models (test fixtures)",
        "",
        "Small real models trained on scikit-learn's bundled handwritten digits",
        "(`sklearn.datasets.load_digits`: 1797 8x8 images, pixel values 0..16; no download needed).",
        "",
        "Regenerate with `python models/train_digits.py` (deterministic: fixed seeds,",
        "`torch.use_deterministic_algorithms(True)`, one thread).",
        "",
        "## Data",
        "",
        "- Pixels scaled to float32 in [0, 1] (divided by 16), shape `[N, 1, 8, 8]`.",
        "- Split: `np.random.RandomState(0).permutation(1797)`; first 360 are test, the rest (1437) training.",
        f"- `digits_calib.npz` ({size('digits_calib.npz')} B): key `input`, float32 `[256, 1, 8, 8]`, "
        "the first 256 images of the shuffled training split.",
        f"- `digits_test.npz` ({size('digits_test.npz')} B): keys `input` float32 `[360, 1, 8, 8]`, "
        "`label` int64 `[360]`.",
        "",
        "## Models",
        "",
        "Both take `input` float32 `[batch, 1, 8, 8]` and return `logits` float32 `[batch, 10]`",
        "(dynamic batch). Exported with `torch.onnx.export(..., opset_version=17, dynamo=False)`,",
        "then `ir_version` set to 8 so older onnxruntime releases can load them.",
        "BatchNormalization is kept as separate nodes by exporting with",
        "`training=torch.onnx.TrainingMode.PRESERVE` on the eval-mode model (BN `training_mode=0`,",
        "running stats as initializers); the default `TrainingMode.EVAL` with `do_constant_folding=True`",
        "would fold BN into the preceding Conv.",
        "Trained with Adam, cosine LR schedule, batch 64, cross-entropy.",
        "",
        "| file | architecture | params | epochs / lr | test acc (onnxruntime) | size |",
        "|---|---|---|---|---|---|",
    ]
    arch = {
        "digits_mlp": "Flatten, Linear(64,128), ReLU, Linear(128,64), ReLU, Linear(64,10)",
        "digits_cnn": "Conv(1,32,3)+BN+ReLU, Conv(32,64,3)+BN+ReLU, MaxPool2, "
                      "Conv(64,64,3)+ReLU, GlobalAvgPool, Linear(64,10)",
    }
    for r in results:
        lines.append(
            f"| `{r['name']}.onnx` | {arch[r['name']]} | {r['params']} | "
            f"{r['hp']['epochs']} / {r['hp']['lr']} | {r['acc'] * 100:.2f}% "
            f"({round(r['acc'] * N_TEST)}/{N_TEST}) | {r['size']} B |")
    lines += ["", "ONNX op types:", ""]
    for r in results:
        lines.append(f"- `{r['name']}`: {', '.join(r['ops'])}")
    lines += ["", "The test accuracy from onnxruntime equals the PyTorch accuracy (checked by the script).", ""]
    with open(os.path.join(HERE, "README.md"), "w") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    main()
