"""End-to-end KL of the windowed model to the dense one: train only small parts
(the converted layers' linear branch, LoRA on MLPs), then PPL on held-out Moby-Dick."""
import sys, time, math, torch
sys.path.insert(0, 'scripts/prototypes')
from torch_smollm2 import *
from shared_normaliser import LinMixer

args = dict(a.split('=', 1) for a in sys.argv[1:])
layers = [int(x) for x in args.get('layers', '0,1,2,5,6,9,10,11,12,13,14,16,18,19,22,25,26,27,28,29').split(',')]
steps, T, lr = int(args.get('steps', 50)), int(args.get('seq', 512)), float(args.get('lr', 1e-3))
train = args.get('train', 'lin').split('+')
rank = int(args.get('rank', 8))
torch.manual_seed(0)
W = load()
sotu, moby = tokens('sotu'), tokens('moby')

mixers, params, lin_params = {}, [], []
for l in layers:
    if 'lin' in train:
        m = LinMixer(W, l, 64, 4, scale=float(args.get('scale0', -3.0)))
        lin_params += [m.decay, m.scale] + ([m.fq, m.fk] if 'feats' in train else [])
        mixers[l] = (lambda m: (lambda W, l, h: m(h)))(m)
    else:
        mixers[l] = window_mixer(64, 4)

lora = {}
if 'mlp' in train:
    for l in range(L):
        for n in ['ffn_gate', 'ffn_up', 'ffn_down']:
            w = W[f'blk.{l}.{n}.weight']
            a = torch.nn.Parameter(torch.randn(rank, w.shape[1]) / math.sqrt(w.shape[1]))
            b = torch.nn.Parameter(torch.zeros(w.shape[0], rank))
            lora[(l, n)] = (a, b); params += [a, b]

import torch_smollm2 as tm
base_ffn = tm.ffn
def ffn_lora(W, l, x):
    if not lora:
        return base_ffn(W, l, x)
    p = f'blk.{l}.'
    h = rms(x, W[p + 'ffn_norm.weight'])
    def lin(n, z):
        a, b = lora[(l, n)]
        return z @ W[p + n + '.weight'].T + (z @ a.T) @ b.T
    return x + lin('ffn_down', torch.nn.functional.silu(lin('ffn_gate', h)) * lin('ffn_up', h))

def student(span):
    tm.ffn = ffn_lora
    try:
        return forward(W, span, mixers)
    finally:
        tm.ffn = base_ffn

print(f'trainable {sum(p.numel() for p in params + lin_params)} params; {train}', flush=True)
opt = torch.optim.AdamW([{'params': params, 'lr': lr}, {'params': lin_params, 'lr': float(args.get('lin_lr', 1e-2))}], weight_decay=0.0)
t0 = time.time()
offset = 0
for step in range(steps):
    span = torch.tensor(sotu[offset:offset + T]); offset += T
    with torch.no_grad():
        tl = torch.log_softmax(forward(W, span), -1)
    sl = torch.log_softmax(student(span), -1)
    loss = (tl.exp() * (tl - sl)).sum(-1).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 10 == 0 or step == steps - 1:
        print(f'step {step} kl {loss.item():.4f} {offset/(time.time()-t0):.0f} tok/s', flush=True)

def ev(mix):
    tm.ffn = ffn_lora
    try:
        return [ppl(W, moby, c, n, mix) for c, n in [(512, 10), (2048, 5)]]
    finally:
        tm.ffn = base_ffn
with torch.no_grad():
    print('student moby 512/2048:', [round(x, 3) for x in ev(mixers)], flush=True)
    if 'lin' in train and 'mlp' in train:
        print('mlp-only (lin removed):', [round(x, 3) for x in ev({l: window_mixer(64, 4) for l in layers})], flush=True)
