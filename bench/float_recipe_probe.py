"""Float ResNet-20 recipe probe on the JPEG copy of CIFAR-10, in PyTorch on one GPU.

Why this exists: the Keras float model of ``bench/cifar_study.py`` (60 epochs, 45k/5k split,
SGD+Nesterov, lr 0.1 with one warm-up epoch and cosine decay, weight decay 5e-4, batch 128,
pad-4 crop + flip) reached 87.22 % test top-1, below the study's 91 % target. On the 2-core
CPU one such run takes 2.7 h, so the recipe cannot be searched there. This script runs the
same recipe and its variants side by side on a GPU (this workplace's device machine has
PyTorch, not TensorFlow), to tell (a) whether the Keras run is below what the recipe gives on
this data (a bug to find) and (b) which epochs/decay the Keras run should use. It only
chooses hyperparameters: every model the study reports is trained in Keras.

The network mirrors ``qil_keras.resnet20``: bias-free 3x3 convs + BatchNorm (eps 1e-5,
momentum 0.9 in Keras terms), option-B 1x1 projection shortcuts, global average pooling,
Dense head; He-normal conv init, Glorot-uniform head. Weight decay on conv and dense kernels
only. The split: the first 4,500 files (sorted by name) of each class train, the last 500
validate; the 10,000 test images score. Decoding uses Pillow (the Keras pipeline uses
``tf.io.decode_jpeg``; both are libjpeg, pixels may differ by a level).

Usage (on the device machine)::

    python3 bench/float_recipe_probe.py --archive runs/devdata/cifar10-jpg.tar.gz --out $OUT
"""
import argparse
import io
import json
import math
import multiprocessing as mp
import os
import tarfile
import time

import numpy as np

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

# name -> settings that differ from the Keras study's float recipe
CONFIGS = {
    "keras_recipe_60": {},
    "wd1e-4_60": {"weight_decay": 1e-4},
    "epochs_120": {"epochs": 120},
    "epochs_160": {"epochs": 160},
    "all50k_60": {"train_per_class": 5000},
    "lr0.05_60": {"lr": 0.05},
}
BASE = dict(train_per_class=4500, epochs=60, lr=0.1, weight_decay=5e-4, batch=128, warmup=1,
            momentum=0.9, seed=0)


def decode_archive(path):
    from PIL import Image

    arrays = {"train": [[] for _ in CLASSES], "test": [[] for _ in CLASSES]}
    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")),
                         key=lambda m: m.name)
        for m in members:
            parts = m.name.split("/")
            split, cls = parts[-3], parts[-2]
            img = Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
            arrays[split][CLASSES.index(cls)].append(np.asarray(img, dtype=np.uint8))
    return {s: [np.stack(a) for a in per_class] for s, per_class in arrays.items()}


def run_config(name, overrides, data_path, out_dir, device):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    cfg = dict(BASE, **overrides)
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    d = np.load(data_path)
    n = cfg["train_per_class"]
    xtr = np.concatenate([d[f"train_{c}"][:n] for c in range(10)])
    ytr = np.concatenate([np.full(n, c) for c in range(10)])
    xva = np.concatenate([d[f"train_{c}"][4500:] for c in range(10)])
    yva = np.concatenate([np.full(500, c) for c in range(10)])
    xte = np.concatenate([d[f"test_{c}"] for c in range(10)])
    yte = np.concatenate([np.full(len(d[f"test_{c}"]), c) for c in range(10)])
    to = lambda a: torch.from_numpy(a).to(device)
    xtr, ytr, xva, yva, xte, yte = map(to, (xtr, ytr, xva, yva, xte, yte))
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255

    def prep(x):  # NHWC uint8 -> NCHW normalized float
        return (x.permute(0, 3, 1, 2).float() - mean) / std

    ar = torch.arange(32, device=device)

    def augment(x):  # pad 4 with black, random 32x32 crop, random horizontal flip
        b = x.shape[0]
        xp = F.pad(x, (0, 0, 4, 4, 4, 4))
        i = torch.randint(0, 9, (b,), device=device)
        j = torch.randint(0, 9, (b,), device=device)
        rows = (i[:, None] + ar)[:, :, None]
        cols = (j[:, None] + ar)[:, None, :]
        out = xp[torch.arange(b, device=device)[:, None, None], rows, cols]
        flip = torch.rand(b, device=device) < 0.5
        return torch.where(flip[:, None, None, None], out.flip(2), out)

    def conv(cin, cout, k, s):
        c = nn.Conv2d(cin, cout, k, s, padding=k // 2, bias=False)
        nn.init.trunc_normal_(c.weight, std=math.sqrt(2.0 / (cin * k * k)) / 0.8796,
                              a=-2 * math.sqrt(2.0 / (cin * k * k)) / 0.8796,
                              b=2 * math.sqrt(2.0 / (cin * k * k)) / 0.8796)
        return c

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)

    class Block(nn.Module):
        def __init__(self, cin, cout, s):
            super().__init__()
            self.c1, self.b1 = conv(cin, cout, 3, s), bn(cout)
            self.c2, self.b2 = conv(cout, cout, 3, 1), bn(cout)
            self.proj = (nn.Sequential(conv(cin, cout, 1, s), bn(cout))
                         if s != 1 or cin != cout else None)

        def forward(self, x):
            y = F.relu(self.b1(self.c1(x)))
            y = self.b2(self.c2(y))
            return F.relu(y + (self.proj(x) if self.proj is not None else x))

    class ResNet20(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv(3, 16, 3, 1), bn(16), nn.ReLU())
            blocks, cin = [], 16
            for stage, cout in enumerate((16, 32, 64)):
                for b in range(3):
                    blocks.append(Block(cin, cout, 2 if stage > 0 and b == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(64, 10)
            nn.init.xavier_uniform_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

        def forward(self, x):
            return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

    model = ResNet20().to(device).to(memory_format=torch.channels_last)
    decay = [p for nme, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for nme, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg["lr"], momentum=cfg["momentum"], nesterov=True)
    steps = len(xtr) // cfg["batch"]
    total, warm = steps * cfg["epochs"], steps * cfg["warmup"]

    def lr_at(step):  # as WarmupCosine in bench/cifar_study.py
        if step < warm:
            return cfg["lr"] * (step + 1.0) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.5 * cfg["lr"] * (1.0 + math.cos(math.pi * t))

    @torch.no_grad()
    def top1(x, y):
        model.eval()
        correct = 0
        for k in range(0, len(x), 1000):
            correct += (model(prep(x[k:k + 1000]).contiguous(memory_format=torch.channels_last))
                        .argmax(1) == y[k:k + 1000]).sum().item()
        model.train()
        return correct / len(x)

    log = open(os.path.join(out_dir, f"{name}.jsonl"), "w")   # line 1: settings; then epochs
    log.write(json.dumps({"config": name, "settings": cfg}) + "\n")
    step, t0 = 0, time.time()
    for epoch in range(cfg["epochs"]):
        perm = torch.randperm(len(xtr), device=device)
        seen = 0
        loss_sum = torch.zeros((), device=device)
        hits = torch.zeros((), device=device)
        for k in range(steps):
            idx = perm[k * cfg["batch"]:(k + 1) * cfg["batch"]]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            x = prep(augment(xtr[idx])).contiguous(memory_format=torch.channels_last)
            logits = model(x)
            loss = F.cross_entropy(logits, ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
            hits += (logits.argmax(1) == ytr[idx]).sum()
            seen += len(idx)
            step += 1
        row = {"epoch": epoch + 1, "train_top1": hits.item() / seen,
               "train_loss": loss_sum.item() / steps, "s": round(time.time() - t0, 1)}
        if (epoch + 1) % 5 == 0 or epoch + 1 == cfg["epochs"]:
            row["val_top1"] = top1(xva, yva)
        if epoch + 1 == cfg["epochs"]:
            row["test_top1"] = top1(xte, yte)
        log.write(json.dumps(row) + "\n")
        log.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archive", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--configs", default=",".join(CONFIGS))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    arrays = decode_archive(args.archive)
    data_path = "/tmp/cifar10_probe.npz"
    np.savez(data_path, **{f"{s}_{c}": a for s, per in arrays.items() for c, a in enumerate(per)})
    print(f"decoded in {time.time() - t0:.1f} s", flush=True)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run_config, args=(n, CONFIGS[n], data_path, args.out, "cuda"))
             for n in args.configs.split(",")]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join()


if __name__ == "__main__":
    main()
