"""Torch prototype of SmolLM2 with per-layer mixers, for design experiments only."""
import math, numpy as np, torch, gguf
torch.set_num_threads(2)

GGUF = 'assets/models/SmolLM2-135M-Instruct.Q4_1.gguf'

def load():
    r = gguf.GGUFReader(GGUF)
    W = {}
    for t in r.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        W[t.name] = torch.from_numpy(np.ascontiguousarray(a.astype(np.float32)).reshape([int(x) for x in reversed(t.shape)] if a.ndim > 1 else -1))
    return W

D, H, G, P, L, VOCAB = 576, 9, 3, 64, 30, 49152
EPS, BASE = 1e-5, 100000.0

def rope_tables(n):
    inv = BASE ** (-torch.arange(0, P // 2, dtype=torch.float64) * 2.0 / P)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(ang).float(), torch.sin(ang).float()

COS, SIN = rope_tables(8192)

def rope(x, pos0=0):
    # x (T, heads, P), normal (adjacent pairs)
    T = x.shape[0]
    c, s = COS[pos0:pos0 + T][:, None, :], SIN[pos0:pos0 + T][:, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out

def rms(x, w):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + EPS) * w

def span_mask(T, window=0, sink=0):
    t = torch.arange(T)[:, None]; s = torch.arange(T)[None, :]
    seen = s <= t
    if window:
        seen = seen & ((s < sink) | (s > t - window))
    return seen

def attn_parts(W, l, h, mask):
    """q/k/v, window read-out a (T,H,P), per-row max m and sum Z over `mask`."""
    T = h.shape[0]
    p = f'blk.{l}.'
    q = rope((h @ W[p + 'attn_q.weight'].T).view(T, H, P))
    k = rope((h @ W[p + 'attn_k.weight'].T).view(T, G, P))
    v = (h @ W[p + 'attn_v.weight'].T).view(T, G, P)
    kk = k.repeat_interleave(H // G, dim=1)
    vv = v.repeat_interleave(H // G, dim=1)
    s = torch.einsum('thp,shp->hts', q, kk) / math.sqrt(P)
    s = s.masked_fill(~mask[None], float('-inf'))
    m = s.max(-1, keepdim=True).values
    e = torch.exp(s - m)
    Z = e.sum(-1, keepdim=True)
    a = torch.einsum('hts,shp->thp', e / Z, vv)
    return a, m[..., 0].T, Z[..., 0].T   # (T,H,P), (T,H), (T,H)

def ffn(W, l, x):
    p = f'blk.{l}.'
    h = rms(x, W[p + 'ffn_norm.weight'])
    g = h @ W[p + 'ffn_gate.weight'].T
    u = h @ W[p + 'ffn_up.weight'].T
    return x + (torch.nn.functional.silu(g) * u) @ W[p + 'ffn_down.weight'].T

def forward(W, tokens, mixers=None, hooks=None):
    """Logits (T, V). mixers: dict layer -> callable(W, l, h) -> (T, D) mixer output."""
    T = len(tokens)
    x = W['token_embd.weight'][tokens]
    full = span_mask(T)
    for l in range(L):
        h = rms(x, W[f'blk.{l}.attn_norm.weight'])
        if hooks and l in hooks:
            hooks[l](x, h)
        if mixers and l in mixers:
            y = mixers[l](W, l, h)
        else:
            a, _, _ = attn_parts(W, l, h, full)
            y = a.reshape(T, H * P) @ W[f'blk.{l}.attn_output.weight'].T
        x = ffn(W, l, x + y)
    return rms(x, W['output_norm.weight']) @ W['token_embd.weight'].T

def window_mixer(window, sink):
    def f(W, l, h):
        a, _, _ = attn_parts(W, l, h, span_mask(h.shape[0], window, sink))
        return a.reshape(h.shape[0], H * P) @ W[f'blk.{l}.attn_output.weight'].T
    return f

def ppl(W, tokens, ctx, chunks, mixers=None):
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(chunks):
            span = torch.tensor(tokens[i * ctx:(i + 1) * ctx], dtype=torch.long)
            logits = forward(W, span, mixers)
            first = ctx // 2
            lp = torch.log_softmax(logits[first:ctx - 1].double(), -1)
            tgt = span[first + 1:]
            nll -= lp.gather(1, tgt[:, None]).sum().item()
            n += len(tgt)
    return math.exp(nll / n)

def tokens(name):
    return np.fromfile(f'runs/proto/{name}.u32', dtype=np.uint32).astype(np.int64)
