"""MCTF: multi-criteria token fusion with one-step-ahead attention (Lee, Choi, Kim; CVPR 2024), training-free.

ToMe's bipartite matching with a score that multiplies three criteria, then bidirectional matching
and attention-weighted fusion, as the official code (mlvlab/MCTF, ``utils/mctf.py``) does it:

* **similarity** ``((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)`` of the hidden states;
* **informativeness** ``(i_a * i_b) ** (1 / tau_info)``, ``i = 1 / (attention the token receives,
  averaged over heads and queries)``, divided by its maximum over the sequence (tokens few attend to
  fuse first);
* **size** ``(s_a * s_b) ** (1 / tau_size)``, ``s = 1 / size`` divided by its maximum (small tokens
  fuse first). A ``tau`` of 0 leaves its criterion out.

The sequence (special tokens included) alternates into A (even positions) and B (odd), as in ToMe.
**Bidirectional**: ``r // 2`` A tokens merge into their best B token (the rest of A stays, in index
order), then the ``r - r // 2`` B tokens whose best match among the unmerged A tokens scores highest
merge into it -- a B token carries what it received along; the output is the unmerged A tokens
followed by the unmerged B tokens in descending score order (the official ``torch.cat([dst2,
unm2])``). **Fusion**: each output token is the mean of its group weighted by ``attention received x
size`` (the official ``pooling_type=1``); sizes add up.

**One-step-ahead attention.** The official block (``one_step_ahead=1``) computes the attention
probabilities of block ``l`` on its input tokens, fuses the input tokens with them as the
informativeness, and then runs block ``l``'s attention on the fused tokens with those probabilities
fused too (keys summed, queries weighted): the attention that scores the tokens is the one they pass
through next. Here the shared reducing block fuses after block ``l``'s attention, scored by that same
attention (computed exactly on the unfused tokens) and before its MLP, so the fused tokens pass the
same attention and MLP as in the official block without the fused-attention approximation. The
difference: the official block runs ``v``, ``attention @ v`` and the output projection on the ``T'``
fused tokens, this one on the ``T`` tokens before fusing -- ``2 (T - T') C^2 + H d (T^2 - T'^2)`` more
multiply-adds per reducing block, which the cost model and ``flops=`` count (the attention of every
block is counted on the tokens it runs on). The criteria cost ``ceil(T/2) floor(T/2) C`` for the
similarity (``C`` the width of the hidden states) and ``r`` additions for the fusion weights'
normalisation (:meth:`MCTF.overhead_flops`).

Defaults from the official evaluation script (``run/eval_deit_s_mctf.sh``: ``tau`` 1 / 20 / 40,
bidirectional, proportional attention, blocks 1-11 of 12, ``r = 16``). The similarity uses the hidden
states after the attention residual (the official code, fusing before the attention, uses the block's
input). A block fuses at most half its reducible tokens and leaves at least 9 (the official code keeps
10, class token included), silently clamping ``r`` as the official code does (``clamp=False`` refuses
an ``r`` too large instead).
"""
import torch

from ..interfaces import Plan, Signals, ViTMethod
from ..kernels import dispatch
from .block_options import check_layers, check_layers_fit


def received_attention(attn: torch.Tensor) -> torch.Tensor:
    """Attention each token receives, averaged over heads and queries: ``[B, H, N, N]`` -> ``[B, N]`` float32
    (accumulated in float32, no float32 copy of a half-precision attention)."""
    return attn.mean(dim=(1, 2), dtype=torch.float32)


def mctf_scores(x: torch.Tensor, inform: torch.Tensor, inv_size: torch.Tensor, a_idx: torch.Tensor,
                b_idx: torch.Tensor, tau_sim: float, tau_info: float, tau_size: float) -> torch.Tensor:
    """The multi-criteria score ``[B, Na, Nb]`` of every A token against every B token (float32; the
    similarity is computed in the tokens' dtype)."""
    metric = x / x.norm(dim=-1, keepdim=True)
    a, b = metric[:, a_idx], metric[:, b_idx]
    if tau_sim:
        scores = (((a @ b.transpose(1, 2)).float() + 1) / 2) ** (1 / tau_sim)
    else:
        scores = torch.ones(a.shape[0], a.shape[1], b.shape[1], device=x.device)
    if tau_info:
        scores = scores * (inform[:, a_idx, None] * inform[:, None, b_idx]) ** (1 / tau_info)
    if tau_size:
        scores = scores * (inv_size[:, a_idx, None] * inv_size[:, None, b_idx]) ** (1 / tau_size)
    return scores


def mctf_plan(x: torch.Tensor, attn: torch.Tensor, size: torch.Tensor, r: int, num_prefix: int, *,
              tau_sim: float = 1.0, tau_info: float = 20.0, tau_size: float = 40.0, bidirection: bool = True) -> Plan:
    """One MCTF fusion of ``r`` of the reducible tokens ``x[B, T, C]`` (sizes ``size[B, T]``), after
    ``num_prefix`` special tokens, scored with the attention ``attn[B, H, N, N]`` over all ``N`` tokens.

    Returns a plan whose ``merge_weight`` are the fusion weights ``attention received x size``
    normalised over each output token's group.
    """
    B, T, _ = x.shape
    p = num_prefix
    device = x.device
    received = received_attention(attn)  # [B, N], special tokens included (they take part in the maxima)
    inform = 1 / received
    inform = (inform / inform.amax(dim=1, keepdim=True))[:, p:]
    size = size.float()
    inv_size = 1 / size
    if p == 0:  # special tokens have size 1, the largest 1 / size there can be
        inv_size = inv_size / inv_size.amax(dim=1, keepdim=True)
    first_a = p % 2  # the sequence alternates from its first (special) token
    a_idx = torch.arange(first_a, T, 2, device=device)
    b_idx = torch.arange(1 - first_a, T, 2, device=device)
    scores = mctf_scores(x, inform, inv_size, a_idx, b_idx, tau_sim, tau_info, tau_size)
    r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
    n_b = b_idx.shape[0]

    node_max, node_idx = scores.max(dim=-1)
    edge_idx = dispatch.topk_indices(node_max, node_max.shape[1])  # best match first (the official argsort)
    src1, unm = edge_idx[:, :r1], edge_idx[:, r1:]
    dst1 = node_idx.gather(1, src1)  # positions in B
    if p > 0:  # the official code sorts the unmerged A tokens when it protects tokens
        unm = unm.sort(dim=1).values
    n_u = unm.shape[1]
    if bidirection:
        to_unm = scores.gather(1, unm.unsqueeze(-1).expand(-1, -1, n_b)).transpose(1, 2)  # [B, Nb, Nu]
        node_max2, node_idx2 = to_unm.max(dim=-1)
        edge_idx2 = dispatch.topk_indices(node_max2, n_b)
        src2, unm2 = edge_idx2[:, :r2], edge_idx2[:, r2:]
        dst2 = node_idx2.gather(1, src2)  # positions among the unmerged A tokens
        # where each B token ends up in the output: its own slot after the A tokens, or its A token's
        b_out = torch.zeros_like(node_max2, dtype=torch.long)
        b_out.scatter_(1, unm2, torch.arange(n_u, n_u + n_b - r2, device=device).expand(B, -1))
        b_out.scatter_(1, src2, dst2)
        keep = torch.cat([a_idx[unm], b_idx[unm2]], dim=1)
        merge_src = torch.cat([a_idx[src1], b_idx[src2]], dim=1)
        merge_dst = torch.cat([b_out.gather(1, dst1), dst2], dim=1)
    else:
        keep = torch.cat([a_idx[unm], b_idx.expand(B, -1)], dim=1)
        merge_src, merge_dst = a_idx[src1], dst1 + n_u

    # fusion weights: attention received x size (the official divides the size by its maximum,
    # special tokens' 1 included), normalised over each output token's group
    size_max = size.amax(dim=1, keepdim=True)
    if p > 0:
        size_max = size_max.clamp(min=1.0)
    weight = received[:, p:] * (size / size_max)
    total = weight.gather(1, keep).scatter_add(1, merge_dst, weight.gather(1, merge_src))
    group = torch.zeros_like(weight, dtype=torch.long)
    group.scatter_(1, keep, torch.arange(keep.shape[1], device=device).expand(B, -1))
    group.scatter_(1, merge_src, merge_dst)
    return Plan(keep=keep, merge_src=merge_src, merge_dst=merge_dst, merge_weight=weight / total.gather(1, group))



def _is_tau(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


class MCTF(ViTMethod):
    name = "mctf"
    kind = "merge"
    defaults = {"tau_sim": 1.0, "tau_info": 20.0, "tau_size": 40.0, "bidirection": True, "layers": None,
                "clamp": True}
    default_budget = {"r": 16}  # the official evaluation script's, in every block but the first
    option_help = {
        "tau_sim": "temperature of the similarity criterion (0 leaves it out)",
        "tau_info": "temperature of the informativeness criterion, 1 / attention received (0 leaves it out)",
        "tau_size": "temperature of the size criterion, 1 / size (0 leaves it out)",
        "bidirection": "bidirectional matching: r // 2 tokens A -> B, then r - r // 2 tokens B -> unmerged A",
        "layers": "block indices that fuse (None: every block but the first, as the official scripts)",
        "clamp": "fuse at most what each block can (half its tokens, 9 left), silently as the official code does, "
                 "instead of refusing an r too large for the model",
    }

    def validate(self, options) -> None:
        for name in ("tau_sim", "tau_info", "tau_size"):
            if not _is_tau(options[name]):
                raise ValueError(f"mctf {name}={options[name]!r} must be a number >= 0 (0 leaves the criterion out)")
        layers = options["layers"]
        check_layers("mctf", layers, "every block but the first")

    def clamps(self, options) -> bool:
        return options["clamp"]

    def reduces(self, layer, num_layers, options) -> bool:
        layers = options["layers"]
        return layer >= 1 if layers is None else layer in layers

    def needs_attention(self, layer, num_layers, options) -> bool:
        return self.reduces(layer, num_layers, options)  # the fusion weights read the attention too

    def max_remove(self, tokens, layer, num_layers, options) -> int:
        layers = options["layers"]
        if layers is not None:
            check_layers_fit("mctf", layers, num_layers)
        return max(min(tokens // 2, tokens - 9), 0)

    def overhead_flops(self, tokens, num_prefix, remove, num_heads, head_dim, layer, num_layers, options) -> int:
        t = tokens - num_prefix
        similarity = ((t + 1) // 2) * (t // 2) * num_heads * head_dim if options["tau_sim"] else 0
        return similarity + remove  # + the scatter-add of the fusion weights' group sums

    def plan(self, signals: Signals, remove: int, options) -> Plan:
        return mctf_plan(signals.x, signals.attn, signals.size, remove, signals.num_prefix,
                         tau_sim=options["tau_sim"], tau_info=options["tau_info"], tau_size=options["tau_size"],
                         bidirection=options["bidirection"])
