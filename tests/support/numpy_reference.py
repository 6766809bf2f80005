"""Independent references: plain NumPy loops written from the equations.

Nothing here imports ppllava_jax. Each function follows the paper / the
reference document (shared/reference/original-implementation.md) literally.
"""

import numpy as np


def relevance(patch_emb, text_emb, logit_scale, mask=None):
  """Eq. 1: softmax over all (t, h, w) of exp(scale) * cos(c, v)."""
  b, t, h, w, _ = patch_emb.shape
  out = np.zeros((b, t, h, w), np.float64)
  for n in range(b):
    c = text_emb[n] / np.linalg.norm(text_emb[n])
    logits = {}
    for ti in range(t):
      for hi in range(h):
        for wi in range(w):
          if mask is not None and not mask[n, ti, hi, wi]:
            continue
          v = patch_emb[n, ti, hi, wi]
          logits[ti, hi, wi] = np.exp(logit_scale) * float(v @ c) / np.linalg.norm(v)
    top = max(logits.values())
    denom = sum(np.exp(l - top) for l in logits.values())
    for pos, l in logits.items():
      out[(n,) + pos] = np.exp(l - top) / denom
  return out


def pool(x, probs, kernel, stride, mode, temperature=0.01):
  """Eq. 2-3 and the original's softmax-renormalised window average, as loops."""
  b, t, h, w, d = x.shape
  (kt, kh, kw), (st, sh, sw) = kernel, stride
  ot, oh, ow = (t - kt) // st + 1, (h - kh) // sh + 1, (w - kw) // sw + 1
  out = np.zeros((b, ot, oh, ow, d), np.float64)
  for n in range(b):
    for i in range(ot):
      for j in range(oh):
        for k in range(ow):
          tokens, p = [], []
          for a in range(kt):
            for c in range(kh):
              for e in range(kw):
                pos = (n, i * st + a, j * sh + c, k * sw + e)
                tokens.append(x[pos])
                p.append(probs[pos])
          p = np.asarray(p, np.float64)
          if mode == "softmax":
            wts = np.exp((p - p.max()) / temperature)
            wts /= wts.sum()
          elif mode == "weighted_sum":
            wts = p
          elif mode == "average":
            wts = np.full(len(p), 1.0 / len(p))
          elif mode == "max":
            wts = np.zeros(len(p))
            wts[int(np.argmax(p))] = 1.0
          out[n, i, j, k] = sum(wt * tok for wt, tok in zip(wts, tokens))
  return out


def extend_positions_original(table, keep=20):
  """The original `convert_text_position` rule, ratio 4, as in the reference doc."""
  length, dim = table.shape
  new = np.zeros((4 * length - 3 * keep, dim), np.float64)
  for i in range(keep):
    new[i] = table[i]
  for i in range(length - 1 - keep):
    for k in range(4):
      new[keep + 4 * i + k] = ((4 - k) * table[keep + i] + k * table[keep + i + 1]) / 4
  for k in range(4):
    new[len(new) - 4 + k] = table[-1] + k * (table[-1] - table[-2]) / 4
  return new


def interpolate_positions(table, new_length):
  """Eq. 4 with r = L / new_length, extrapolating past the last row."""
  length = table.shape[0]
  r = length / new_length
  out = np.zeros((new_length, table.shape[1]), np.float64)
  for i in range(new_length):
    j = i * r
    lo = min(int(np.floor(j)), length - 2)
    out[i] = table[lo] + (j - lo) * (table[lo + 1] - table[lo])
  return out
