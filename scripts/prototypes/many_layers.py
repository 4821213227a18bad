"""Stage-wise conversion of many layers to sink + window + normalized linear attention
(frozen random softmax features; only decay and scale trained), then PPL at 512 / 2048."""
import sys, time, math, torch
sys.path.insert(0, 'scripts/prototypes')
from torch_smollm2 import *
from shared_normaliser import LinMixer

layers = [int(x) for x in sys.argv[1].split(',')]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100
train_feats = len(sys.argv) > 3 and sys.argv[3] == 'feats'
T, NW = 1024, 8
W = load()
sotu, moby = tokens('sotu'), tokens('moby')
mixers = {}

def layer_input(span, stop):
    x = W['token_embd.weight'][span]
    full = span_mask(len(span))
    for l in range(stop + 1):
        h = rms(x, W[f'blk.{l}.attn_norm.weight'])
        if l == stop:
            return h
        if l in mixers:
            y = mixers[l](W, l, h)
        else:
            a, _, _ = attn_parts(W, l, h, full)
            y = a.reshape(len(span), H * P) @ W[f'blk.{l}.attn_output.weight'].T
        x = ffn(W, l, x + y)

t0 = time.time()
for layer in layers:
    with torch.no_grad():
        hs = [layer_input(torch.tensor(sotu[i * T:(i + 1) * T]), layer) for i in range(NW)]
        full = span_mask(T)
        ts = []
        for h in hs:
            a, _, _ = attn_parts(W, layer, h, full)
            ts.append(a.reshape(T, H * P) @ W[f'blk.{layer}.attn_output.weight'].T)
        ms = sum((t ** 2).mean() for t in ts) / len(ts)
        win = window_mixer(64, 4)
        werr = sum(((win(W, layer, h) - t) ** 2).mean().item() for h, t in zip(hs, ts)) / len(ts) / ms.item()
    mix = LinMixer(W, layer, 64, 4)
    params = list(mix.parameters()) if train_feats else [mix.decay, mix.scale]
    opt = torch.optim.Adam(params, lr=1e-2)
    for step in range(steps):
        i = step % NW
        loss = ((mix(hs[i]) - ts[i]) ** 2).mean() / ms
        opt.zero_grad(); loss.backward(); opt.step()
    for p in mix.parameters():
        p.requires_grad_(False)
    mixers[layer] = (lambda m: (lambda W, l, h: m(h)))(mix)
    print(f'layer {layer}: window err {werr:.4f} -> {loss.item():.4f} (train, last) scale {mix.scale.exp().mean():.3f} '
          f'gamma {[round(g, 5) for g in torch.sigmoid(mix.decay).tolist()]} {time.time()-t0:.0f}s', flush=True)

with torch.no_grad():
    win = {l: window_mixer(64, 4) for l in layers}
    for ctx, chunks in [(512, 10), (2048, 5)]:
        d = ppl(W, moby, ctx, chunks)
        w = ppl(W, moby, ctx, chunks, win)
        h = ppl(W, moby, ctx, chunks, mixers)
        print(f'moby ctx {ctx}: dense {d:.3f} window-only {w:.3f} hybrid {h:.3f} '
              f'(+{(h/d-1)*100:.1f}% vs +{(w/d-1)*100:.1f}%; recovered {(w-h)/(w-d)*100:.0f}%)', flush=True)
