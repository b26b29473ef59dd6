"""VarDiU's bound, term by term, over the first iterations of a distillation of the shipped MNIST
teacher: where a diverging run goes wrong.

Each iteration prints, averaged over the batch, the encoder term −w log q and the teacher term
−w sg(m)ᵀx_g of the per-sample loss, the norms of their gradients with respect to x_g (the
generator's direction, per sample), the cosine between the two, and the mean pixel of x_g (the
diverging runs darken towards −1). Generator and encoder are then stepped as refine/loop.py does
(Adam, betas (0, 0.999); the encoder at the divergence's module_lr).

  OMP_NUM_THREADS=1 python bench/vardiu_terms.py --encoder mlp --iters 20
  OMP_NUM_THREADS=1 python bench/vardiu_terms.py --encoder conv --iters 20
"""

import json
import os
import sys

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from refine import run # pylint: disable=wrong-import-position
from torch_utils.rng import StreamRandom, derive_seed # pylint: disable=wrong-import-position

@click.command(context_settings=dict(show_default=True))
@click.option('--teacher', default='pretrained/edm-mnist32-cond.pkl')
@click.option('--encoder', default='auto', help='auto | mlp | conv')
@click.option('--iters', default=20)
@click.option('--batch', default=32)
@click.option('--glr', default=1e-4)
@click.option('--div-opt', 'div_opt', multiple=True, help='KEY=VALUE, as refine.py')
@click.option('--out', default=None, help='Also write the rows as JSON lines here')
def main(teacher, encoder, iters, batch, glr, div_opt, out):
    opts = dict(kv.split('=', 1) for kv in div_opt)
    opts['encoder'] = encoder
    o = run.resolve_options(dict(teacher=teacher, gen='teacher', divergence='vardiu', batch=batch, lr=glr,
        glr=glr, kimg=1, seed=0, div_opt=opts, allow_pickle_code=False))
    setup = run.prepare(o)
    G, T, div = setup.G.train().requires_grad_(True), setup.teacher.eval().requires_grad_(False), setup.divergence
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(0, 'divergence-setup'))
        div.setup(G=G, teacher=T)
    enc = div.encoder.train()
    g_opt = torch.optim.Adam(G.parameters(), lr=glr, betas=(0.0, 0.999), eps=1e-8)
    e_opt = torch.optim.Adam(enc.parameters(), lr=div.module_lr or glr, betas=(0.0, 0.999), eps=1e-8)
    print(f'encoder {type(enc).__name__} ({sum(p.numel() for p in enc.parameters())} parameters), '
        f'lr {div.module_lr or glr:g}; generator lr {glr:g}; batch {batch}', flush=True)
    print('iter  kimg  sigma_mean  -w*logq   -w*m.x  |grad enc|  |grad tea|  cos(enc,tea)  |grad sum|  mean(x_g)')
    rows = []
    for it in range(iters):
        nimg = it * batch
        div.set_progress(nimg)
        rnd = StreamRandom(0, nimg, 'gen', batch)
        z = div.draw_latents(rnd, G.z_shape)
        c = rnd.labels(G.label_dim)
        x_g = G(z, c)
        x_leaf = x_g.detach().requires_grad_(True)
        # The divergence's own loss at x_leaf, split into its two terms by recomputing the teacher term.
        sigma = div.sample_sigma(rnd)
        s = sigma.reshape(-1, 1, 1, 1)
        x_t = x_leaf + s * div.sample_noise(rnd, x_g.shape[1:])
        log_q = div.encoder_log_prob(z, x_t, sigma, c)
        with torch.no_grad():
            m = (T(x_t.detach(), sigma, c) - x_leaf) / s ** 2
        w = div.sigma_weight(sigma)
        enc_term, tea_term = -w * log_q, -w * (m * x_leaf).flatten(1).sum(1)
        g_enc, = torch.autograd.grad(enc_term.sum(), x_leaf, retain_graph=True)
        g_tea = -w.reshape(-1, 1, 1, 1) * m
        ge, gt = g_enc.flatten(1), g_tea.flatten(1)
        cos = torch.nn.functional.cosine_similarity(ge, gt, dim=1)
        row = dict(iter=it, kimg=nimg / 1e3, sigma=float(sigma.mean()), enc_term=float(enc_term.detach().mean()),
            teacher_term=float(tea_term.mean()), grad_enc=float(ge.norm(dim=1).mean()),
            grad_teacher=float(gt.norm(dim=1).mean()), cos=float(cos.mean()),
            grad_sum=float((ge + gt).norm(dim=1).mean()), mean_x=float(x_g.mean()))
        rows.append(row)
        print(f"{it:4d} {row['kimg']:5.2f} {row['sigma']:10.4f} {row['enc_term']:9.1f} {row['teacher_term']:9.1f} "
            f"{row['grad_enc']:10.3f} {row['grad_teacher']:10.3f} {row['cos']:12.3f} {row['grad_sum']:10.3f} {row['mean_x']:10.4f}", flush=True)
        # The update, as the loop makes it: the loss (sum over the batch / batch) backpropagated
        # into both the encoder (log q) and the generator (through x_t and the teacher term).
        g_opt.zero_grad(set_to_none=True)
        e_opt.zero_grad(set_to_none=True)
        (enc_term + tea_term).sum().div(batch).backward(inputs=list(enc.parameters()), retain_graph=True)
        x_g.backward((g_enc + g_tea) / batch)
        if not div.warming_up(): # encoder_warmup_kimg: the encoder alone at first
            g_opt.step()
        e_opt.step()
    if out:
        with open(out, 'w') as f:
            for row in rows:
                f.write(json.dumps(row) + '\n')

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter
