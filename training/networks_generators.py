"""Generator wrappers with the one interface the refinement loop knows: `G(z, c) -> x`.

Each wrapper exposes `z_shape` and `out_shape` (per-sample shapes), `label_dim` and `is_vector`
(True for vector data such as 2-D mixtures, False for images). They are persistent classes,
so a snapshot pickles them in the NVlabs format together with the network they wrap. Like
every file that ends up inside pickles, this one imports only numpy, torch and
torch_utils.persistence.
"""

import torch

from torch_utils import persistence

@persistence.persistent_class
class OneStepGenerator(torch.nn.Module):
    """A denoiser used as a one-step generator: x = D(sigma_init * z, sigma_init, c).

    This is how Diff-Instruct, SiD, DMD and their relatives initialise the student from the
    teacher. `sigma_init` is a training-time constant and is saved with the generator.
    """
    _record_init_args = False # recorded below, referring to `net` rather than copying it

    def __init__(self, net, sigma_init):
        super().__init__()
        self.net = net
        self.sigma_init = float(sigma_init)
        self.label_dim = int(net.label_dim)
        if hasattr(net, 'img_resolution'):
            self.z_shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
        else:
            self.z_shape = (int(net.dim),)
        self.out_shape = self.z_shape
        self.is_vector = len(self.z_shape) == 1
        self._init_args = ()
        self._init_kwargs = dict(net=net, sigma_init=self.sigma_init)

    def forward(self, z, c=None):
        sigma = torch.full([z.shape[0]], self.sigma_init, dtype=torch.float32, device=z.device)
        return self.net(self.sigma_init * z.to(torch.float32), sigma, c)

@persistence.persistent_class
class LatentGenerator(torch.nn.Module):
    """Any latent-variable network `net(z, c)` with attributes z_dim and dim (an MLP, say)."""
    _record_init_args = False

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.label_dim = int(getattr(net, 'label_dim', 0))
        self.z_shape = (int(net.z_dim),)
        self.out_shape = (int(net.dim),)
        self.is_vector = True
        self._init_args = ()
        self._init_kwargs = dict(net=net)

    def forward(self, z, c=None):
        return self.net(z.to(torch.float32), c)
