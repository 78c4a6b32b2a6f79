"""Proportional attention on and off for the merging methods, on the embedded reference model's
3,000 real images: top-1, top-1 agreement with the uncompressed model, KL of the logits and
1 - cosine of the logits.

    python experiments/prop_attn_ablation.py
"""
import torch, vitcompress
from vitcompress import reference_model
model, images, labels = reference_model.load()
with torch.no_grad():
    base = model(images)
def run(method, **kw):
    vitcompress.compress(model, method, **kw)
    with torch.no_grad():
        out = model(images)
    vitcompress.restore(model)
    top1 = (out.argmax(-1) == labels).float().mean().item()
    agree = (out.argmax(-1) == base.argmax(-1)).float().mean().item()
    kl = torch.nn.functional.kl_div(out.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean").item()
    cos = 1 - torch.nn.functional.cosine_similarity(out, base, dim=-1).mean().item()
    print(f"{method:8s} {str(kw):40s} top1 {100*top1:.2f} agree {100*agree:.1f} KL {kl:.4f} 1-cos(logits) {cos:.2e}")
print("base top1", (base.argmax(-1) == labels).float().mean().item())
for keep in (0.9, 0.8, 0.7):
    for pa in (True, False):
        run("pitome", keep=keep, prop_attn=pa)
for r in (4, 6):
    for pa in (True, False):
        run("tome", r=r, prop_attn=pa)
