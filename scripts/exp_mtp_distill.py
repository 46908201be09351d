#!/usr/bin/env python3
"""MTP self-distillation on the CPU: does adding w * KL(main head at i+1 || MTP head at i) to the MTP loss
(`ModelConfig.mtp_distill`, notebook 07) raise how often the MTP module's draft equals the model's own next choice,
and what does it cost the main model? Trains one small model per setting from the same seed on the same batches
(`metai prepare-data` tokens), then measures on the validation tokens: the main loss, the MTP head's top-1 agreement
with the main head one position on (what self-speculation accepts, teacher-forced), its top-1 accuracy on the text,
and the greedy acceptance of `mtp_speculative_generate` from the first 64 validation tokens.

    python scripts/exp_mtp_distill.py --data-dir output_micro/data --weights 0,1,4 --out bench/results/mtp_distill_cpu.json
"""
import os, sys, math, time, json, argparse
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import save_json
import numpy as np, torch
from metai.config import ModelConfig
from metai.model.transformer import Transformer
from metai.infer.speculative import mtp_speculative_generate

def run(tr, va, w:float, detach:bool, steps:int, B:int=16, T:int=128) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=768, max_seq_len=256,
                      mtp_depth=1, mtp_distill=w)
    m = Transformer(cfg)
    if detach:  # the MTP module reads h^0 without passing gradients back to the trunk
        orig = m.mtp_forward
        m.mtp_forward = lambda k, h, *a: orig(k, h.detach(), *a)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3, weight_decay=0.1, betas=(0.9, 0.95))
    g, t0 = np.random.default_rng(0), time.time()
    for step in range(steps):
        lr = 2e-3 * min(1, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for pg in opt.param_groups: pg['lr'] = lr
        ix = g.integers(0, len(tr) - T - 1, B)
        seq = torch.from_numpy(np.stack([tr[i:i + T + 1].astype(np.int64) for i in ix]))
        _, loss, aux = m(seq[:, :-1], seq[:, 1:])
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step()
        if step % 100 == 0: print(f'  w={w} detach={detach} step {step}: ce {aux["ce"].item():.3f} mtp {aux["mtp_loss"].item():.3f}', flush=True)
    m.eval()
    agree = acc = ce = n = nw = 0
    with torch.no_grad():
        for i in range(0, len(va) - T - 1, T):
            seq = torch.from_numpy(va[i:i + T + 1].astype(np.int64))[None]
            logits, _, aux = m(seq[:, :-1], seq[:, 1:])
            mt = aux['mtp_logits'][0]                                  # (1, T-1, V): position j drafts t_{j+2}
            agree += (mt.argmax(-1) == logits[:, 1:].argmax(-1)).sum().item()
            acc += (mt.argmax(-1) == seq[:, 2:]).sum().item()
            ce += aux['ce'].item(); n += T - 1; nw += 1
        _, st = mtp_speculative_generate(m, va[:64].astype(np.int64).tolist(), 96, gamma=1, temperature=0, static_rounds=True)
    return dict(weight=w, mtp_input_detached=detach, steps=steps, val_ce=ce / nw, mtp_agreement=agree / n, mtp_text_accuracy=acc / n,
                greedy_acceptance=st['acceptance_rate'], seconds=round(time.time() - t0))

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--data-dir', required=True, help='a `metai prepare-data` folder (train.bin, val.bin; 8K vocabulary)')
    ap.add_argument('--weights', default='0,1,4')
    ap.add_argument('--detached-weights', default='4', help='weights also run with the MTP input detached from the trunk')
    ap.add_argument('--steps', type=int, default=400)
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--out', required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tr = np.memmap(os.path.join(a.data_dir, 'train.bin'), dtype=np.uint16, mode='r')
    va = np.memmap(os.path.join(a.data_dir, 'val.bin'), dtype=np.uint16, mode='r')
    res = dict(settings=vars(a), runs=[])
    for w, d in [(float(x), False) for x in a.weights.split(',') if x] + [(float(x), True) for x in a.detached_weights.split(',') if x]:
        r = run(tr, va, w, d, a.steps); res['runs'].append(r); print(json.dumps(r), flush=True)
        save_json(a.out, res)

if __name__ == '__main__': main()
