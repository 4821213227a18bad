import sys, time, math, torch
sys.path.insert(0, 'scripts/prototypes')
from torch_smollm2 import *
from shared_normaliser import LinMixer

layer = int(sys.argv[1]) if len(sys.argv) > 1 else 4
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
lr = float(sys.argv[3]) if len(sys.argv) > 3 else 1e-2
T = 1024
W = load()
sotu, moby = tokens('sotu'), tokens('moby')
held = sotu[2000000:2000000 + 8 * T]

# inputs of the layer from the dense model
def inputs(n, off=0):
    hs = []
    with torch.no_grad():
        for i in range(n):
            span = torch.tensor(sotu[off + i * T: off + (i + 1) * T])
            cap = {}
            forward_until(W, span, layer, cap)
            hs.append(cap['h'])
    return hs

def forward_until(W, tokens, stop, cap):
    T = len(tokens)
    x = W['token_embd.weight'][tokens]
    full = span_mask(T)
    for l in range(stop + 1):
        h = rms(x, W[f'blk.{l}.attn_norm.weight'])
        if l == stop:
            cap['h'] = h
            return
        a, _, _ = attn_parts(W, l, h, full)
        x = ffn(W, l, x + a.reshape(T, H * P) @ W[f'blk.{l}.attn_output.weight'].T)

t0 = time.time()
train = inputs(24)
val = inputs(4, off=24 * T)
with torch.no_grad():
    full = span_mask(T)
    def target(h):
        a, _, _ = attn_parts(W, layer, h, full)
        return a.reshape(T, H * P) @ W[f'blk.{layer}.attn_output.weight'].T
    ttrain = [target(h) for h in train]
    tval = [target(h) for h in val]
    win = window_mixer(64, 4)
    werr = sum(((win(W, layer, h) - t) ** 2).mean().item() for h, t in zip(val, tval)) / sum((t ** 2).mean().item() for t in tval)
print(f'inputs {time.time()-t0:.0f}s; window-only val rel err {werr:.4f}')

mix = LinMixer(W, layer, 64, 4)
freeze = len(sys.argv) > 4 and sys.argv[4] == 'freeze'
params = [mix.decay, mix.scale] if freeze else list(mix.parameters())
opt = torch.optim.Adam(params, lr=lr)
ms = sum((t ** 2).mean() for t in ttrain) / len(ttrain)
t0 = time.time()
for step in range(steps):
    i = step % len(train)
    loss = ((mix(train[i]) - ttrain[i]) ** 2).mean() / ms
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 50 == 0 or step == steps - 1:
        with torch.no_grad():
            v = sum(((mix(h) - t) ** 2).mean().item() for h, t in zip(val, tval)) / sum((t ** 2).mean().item() for t in tval)
        print(f'step {step} loss {loss.item():.4f} val {v:.4f} ({time.time()-t0:.0f}s) scale {mix.scale.detach().exp().mean():.3f} gamma {torch.sigmoid(mix.decay).detach().tolist()}')

with torch.no_grad():
    for name, toks in [('moby', moby), ('sotu-held', held)]:
        d = ppl(W, toks, T, 8 if name == 'moby' else 8)
        w = ppl(W, toks, T, 8, {layer: window_mixer(64, 4)})
        h = ppl(W, toks, T, 8, {layer: lambda W, l, h: mix(h)})
        print(f'{name} ctx {T}: dense {d:.3f} window {w:.3f} hybrid {h:.3f}  (recovered {(w-h)/(w-d)*100:.0f}%)')
