"""Converted layer = sink + window softmax, plus normalized linear attention over the
tokens that left the window, sharing one normaliser (LoLCATs-style)."""
import math, torch
from torch_smollm2 import *

class LinMixer(torch.nn.Module):
    def __init__(self, W, l, window, sink, F=32, decay=0.999, scale=-3.0, wo=None):
        super().__init__()
        self.l, self.window, self.sink, self.F = l, window, sink, F
        p = f'blk.{l}.'
        self.Wq, self.Wk, self.Wv = W[p + 'attn_q.weight'], W[p + 'attn_k.weight'], W[p + 'attn_v.weight']
        self.Wo = W[p + 'attn_output.weight']
        g = torch.Generator().manual_seed(l)
        self.fq = torch.nn.Parameter(torch.randn(H, P, F, generator=g) / math.sqrt(P))
        self.fk = torch.nn.Parameter(torch.randn(G, P, F, generator=g) / math.sqrt(P))
        # per-group decay logit: gamma = sigmoid(.)
        self.decay = torch.nn.Parameter(torch.full((G,), math.log(decay / (1 - decay))))
        self.scale = torch.nn.Parameter(torch.full((H,), scale))

    def forward(self, h):
        T = h.shape[0]
        qp = (h @ self.Wq.T).view(T, H, P)
        kp = (h @ self.Wk.T).view(T, G, P)
        v = (h @ self.Wv.T).view(T, G, P)
        # window part (exact softmax over the span): sums relative to the row max
        q, k = rope(qp), rope(kp)
        kk, vv = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
        s = torch.einsum('thp,shp->hts', q, kk) / math.sqrt(P)
        mask = span_mask(T, self.window, self.sink)
        s = s.masked_fill(~mask[None], float('-inf'))
        m = s.max(-1, keepdim=True).values
        e = torch.exp(s - m)                       # (H,T,T)
        # linear part over tokens that left the window (and are not sinks)
        fq = torch.softmax(torch.einsum('thp,hpf->htf', qp, self.fq), -1)      # (H,T,F)
        fk = torch.softmax(torch.einsum('tgp,gpf->gtf', kp, self.fk), -1)      # (G,T,F)
        fk = fk.repeat_interleave(H // G, 0)
        t_i = torch.arange(T)[:, None]; s_i = torch.arange(T)[None, :]
        old = (s_i <= t_i - self.window) & (s_i >= self.sink)
        gamma = torch.sigmoid(self.decay).repeat_interleave(H // G)             # (H)
        dist = (t_i - s_i).clamp(min=0).float()
        dec = torch.exp(dist[None] * torch.log(gamma)[:, None, None]) * old[None]
        lin = torch.einsum('htf,hsf->hts', fq, fk) * dec * torch.exp(self.scale)[:, None, None]
        num = torch.einsum('hts,shp->thp', e + lin, vv)
        den = (e + lin).sum(-1).T[..., None]        # (T,H,1)
        y = (num / den).reshape(T, H * P)
        return y @ self.Wo.T
